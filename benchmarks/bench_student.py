"""Benchmark the student stage: epoch time of plain BSCE training, cached DiVE and online DiVE, side by side.

    python benchmarks/bench_student.py [--epochs 3] [--views 4]

Same model (the recipe's), same data, same batch, same views, in one process: plain BSCE reads no targets;
cached DiVE streams the teacher's logits from a store written here; online DiVE runs the same-architecture
teacher on every replayed view. Modes are interleaved epoch by epoch so machine load hits them alike, and
the median epoch of each is reported. Also prints how long cached training waited on store data.
Targets: cached / plain <= 1.05 and online / cached >= 1.25.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.settings import cache_settings, student_settings, teacher_settings  # noqa: E402
from pipeline.data.loaders import ViewLoader, make_executor  # noqa: E402
from pipeline.data.targets import CachedTargets, OnlineTargets, row_order  # noqa: E402
from pipeline.train.distributed import Dist  # noqa: E402
from pipeline.train.losses import BalancedSoftmax, DiVELoss  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.data.sources import load_source  # noqa: E402
from pipeline.train.loop import make_optimizer, train_one_epoch  # noqa: E402
from stages.cache import dump  # noqa: E402
from store.reader import LogitStore  # noqa: E402
from store.writer import StoreWriter  # noqa: E402


def model_for(settings, source, device):
    torch.manual_seed(0)
    model = build_model(settings.model, source.num_classes, source.in_channels).to(device)
    return model.to(memory_format=torch.channels_last) if settings.channels_last else model


def write_cache(spec, cache, source, teacher, executor, path: Path, device) -> LogitStore:
    attrs = {"recipe": cache.to_dict(), "view_spec": {}, "fingerprints": {}, "view_seed": cache.view_seed}
    rows = row_order(len(source.train), cache.view_seed)
    writer = StoreWriter.create_or_resume(path, len(source.train), cache.views, source.num_classes, cache.codec,
                                          source.train.labels[rows], source.train.ids[rows], source.class_counts,
                                          attrs)
    dump(spec, cache, teacher, executor, writer, rows, Dist(device=device), log=lambda *a, **k: None)
    writer.mark_complete()
    return LogitStore.open(path)


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
    counts = torch.as_tensor(source.class_counts)
    executor = make_executor(source.train, spec, source.mean, source.std, recipe.batch_size, recipe.workers, device)
    teacher = model_for(teacher_cfg, source, device).eval()
    root = Path(tempfile.mkdtemp(prefix="bench_student."))
    try:
        store = write_cache(spec, cache, source, teacher, executor, root / "logits.zarr", device)
        cached = CachedTargets(store, source.train.ids, executor, recipe.batch_size, seed=0)
        online = OnlineTargets.like(store, source.train, teacher, spec, executor, recipe.batch_size, 0, device,
                                    recipe.bf16, recipe.channels_last)
        plain = ViewLoader(source.train, spec, executor, recipe.batch_size, 0, train=True)
        bsce = BalancedSoftmax(counts).to(device)
        dive = DiVELoss(counts, recipe.tau, recipe.power, recipe.alpha).to(device)
        modes = {
            "plain BSCE": (plain, lambda o, b: bsce(o, b.labels.to(device))),
            "cached DiVE": (cached, lambda o, b: dive(o, b.labels.to(device), b.teacher_logits.to(device))),
            "online DiVE": (online, lambda o, b: dive(o, b.labels.to(device), b.teacher_logits.to(device))),
        }
        models = {name: model_for(recipe, source, device) for name in modes}
        optims = {name: make_optimizer(models[name], recipe) for name in modes}
        times: dict[str, list[float]] = {name: [] for name in modes}
        waits: list[float] = []
        for epoch in range(args.epochs + 1):  # epoch 0 warms up allocators and caches, and is not counted
            for name, (loader, loss_fn) in modes.items():
                before = cached.wait_seconds
                start = time.perf_counter()
                train_one_epoch(models[name], loss_fn, loader.batches(epoch), optims[name], recipe.lr, device,
                                recipe.bf16, recipe.channels_last, Dist(device=device))
                if epoch:
                    times[name].append(time.perf_counter() - start)
                    if name == "cached DiVE":
                        waits.append(cached.wait_seconds - before)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"student benchmark: {args.dataset}, {len(source.train):,} images/epoch, {recipe.model}, batch "
          f"{recipe.batch_size}, {device}, {os.cpu_count()} CPUs, median of {args.epochs} epochs per mode, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<14}{'epoch s':>9}{'images/s':>10}")
    for name, seconds in med.items():
        print(f"{name:<14}{seconds:>9.2f}{len(source.train) / seconds:>10,.0f}")
    print(f"cached / plain  = {med['cached DiVE'] / med['plain BSCE']:.3f}  (target <= 1.05)")
    print(f"online / cached = {med['online DiVE'] / med['cached DiVE']:.3f}  (target >= 1.25)")
    print(f"cached DiVE waited on store data {statistics.median(waits):.3f}s per epoch "
          f"({100 * statistics.median(waits) / med['cached DiVE']:.1f}% of the epoch)")


if __name__ == "__main__":
    main()
