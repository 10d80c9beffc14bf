"""Benchmark the student stage: epoch time of plain BSCE training, cached DiVE and online DiVE, side by side.

    python benchmarks/bench_student.py [--epochs 3] [--views 4]

Same model (the recipe's), same data, same batch, same views, in one process: plain BSCE reads no targets;
cached DiVE streams the teacher's logits from a store written here; online DiVE runs the same-architecture
teacher on every replayed view. Modes are interleaved epoch by epoch so machine load hits them alike, and
the median epoch of each is reported. Also prints how long cached training waited for data (store reads
and view replay that prefetching did not hide).
Targets: cached / plain <= 1.05 and online / cached >= 1.25.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.settings import cache_settings, student_settings, teacher_settings  # noqa: E402
from pipeline.data.loaders import make_executor  # noqa: E402
from pipeline.data.sources import load_source  # noqa: E402
from measure import model_for, student_epochs, write_cache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fmnist-lt")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--views", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_cfg = teacher_settings(args.dataset)
    cache = cache_settings(args.dataset, [f"views={args.views}"])
    recipe = student_settings(args.dataset)
    spec = teacher_cfg.view_spec()
    source = load_source(args.dataset)
    executor = make_executor(source.train, spec, source.mean, source.std, recipe.batch_size, recipe.workers, device)
    teacher = model_for(teacher_cfg, source, device).eval()
    root = Path(tempfile.mkdtemp(prefix="bench_student."))
    try:
        store = write_cache(spec, cache, source, teacher, executor, root / "logits.zarr", device)
        med, waits = student_epochs(source, spec, recipe, store, teacher, executor, device, args.epochs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"student benchmark: {args.dataset}, {len(source.train):,} images/epoch, {recipe.model}, batch "
          f"{recipe.batch_size}, {device}, {os.cpu_count()} CPUs, median of {args.epochs} epochs per mode, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<14}{'epoch s':>9}{'images/s':>10}")
    for name, seconds in med.items():
        print(f"{name:<14}{seconds:>9.2f}{len(source.train) / seconds:>10,.0f}")
    print(f"cached / plain  = {med['cached DiVE'] / med['plain BSCE']:.3f}  (target <= 1.05)")
    print(f"online / cached = {med['online DiVE'] / med['cached DiVE']:.3f}  (target >= 1.25)")
    print(f"cached DiVE waited for data {statistics.median(waits):.3f}s per epoch "
          f"({100 * statistics.median(waits) / med['cached DiVE']:.1f}% of the epoch)")


if __name__ == "__main__":
    main()
