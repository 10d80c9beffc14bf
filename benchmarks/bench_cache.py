"""Benchmark the cache stage's dump against teacher forward passes alone, on the same views.

    python benchmarks/bench_cache.py [--views 8] [--repeats 2]

On the default dataset (fmnist-lt, the ResNet-32 teacher of its recipe, random weights: speed does not
depend on them), side by side in one process, alternating so that machine load hits both alike:
- forward-only: the views of every sample replayed and run through the teacher, logits thrown away;
- dump: the cache stage's own ``dump`` over the same views, writing the store through its background writer.
Prints images/s of each, their ratio (target >= 0.9), store write MB/s and bytes per view.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.settings import cache_settings, teacher_settings  # noqa: E402
from pipeline.data.loaders import make_executor  # noqa: E402
from pipeline.data.targets import row_order  # noqa: E402
from pipeline.train.distributed import Dist  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.data.sources import load_source  # noqa: E402
from stages.cache import directory_bytes, dump, shard_batches, teacher_logits  # noqa: E402
from store import codecs  # noqa: E402
from store.schema import Layout  # noqa: E402
from store.writer import Shard, StoreWriter  # noqa: E402


def forward_only(spec, cache, model, executor, writer_layout, rows, device) -> float:
    """Seconds to run the teacher over every shard's views, without storing anything."""
    start = time.perf_counter()
    shards = [Shard(k, *writer_layout.shard_range(k)) for k in range(writer_layout.n_shards)]
    for part in shard_batches(spec, cache, executor, rows, shards):
        teacher_logits(model, part.images, cache, device)
    return time.perf_counter() - start


def one_dump(spec, cache, model, executor, source, rows, path: Path, device) -> tuple[float, int]:
    """Seconds for the stage's dump into a new store at ``path`` (closed, complete), and its bytes."""
    start = time.perf_counter()
    writer = StoreWriter.create_or_resume(path, len(source.train), cache.views, source.num_classes, cache.codec,
                                          source.train.labels[rows], source.train.ids[rows], source.class_counts,
                                          {"recipe": cache.to_dict(), "view_spec": {}, "fingerprints": {}})
    dump(spec, cache, model, executor, writer, rows, Dist(device=device), log=lambda *a, **k: None)
    writer.mark_complete()
    return time.perf_counter() - start, directory_bytes(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fmnist-lt")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--codec", default="float16")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = teacher_settings(args.dataset)
    cache = cache_settings(args.dataset, [f"views={args.views}", f"codec={args.codec}"])
    spec = teacher.view_spec()
    source = load_source(args.dataset)
    torch.manual_seed(0)
    model = build_model(teacher.model, source.num_classes, source.in_channels).to(device).eval()
    if cache.channels_last:
        model = model.to(memory_format=torch.channels_last)
    executor = make_executor(source.train, spec, source.mean, source.std, cache.batch_size, cache.workers, device)
    images = len(source.train) * args.views
    root = Path(tempfile.mkdtemp(prefix="bench_cache."))
    fwd, dmp, sizes = [], [], []
    try:
        for r in range(args.repeats):
            layout = Layout.choose(len(source.train), args.views, source.num_classes, 8, codecs.check(args.codec))
            rows = row_order(len(source.train), cache.view_seed)
            fwd.append(forward_only(spec, cache, model, executor, layout, rows, device))
            seconds, size = one_dump(spec, cache, model, executor, source, rows, root / f"s{r}.zarr", device)
            dmp.append(seconds)
            sizes.append(size)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    f, d = images / min(fwd), images / min(dmp)
    print(f"cache benchmark: {args.dataset}, {len(source.train):,} images x {args.views} views = {images:,} "
          f"teacher passes, {teacher.model}, batch {cache.batch_size}, {device}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':<28}{'images/s':>10}{'seconds':>10}")
    print(f"{'teacher forward only':<28}{f:>10,.0f}{min(fwd):>10.2f}")
    print(f"{'dump (forward + store)':<28}{d:>10,.0f}{min(dmp):>10.2f}")
    print(f"dump / forward-only = {d / f:.3f}  (target >= 0.9; best of {args.repeats} each)")
    logit_bytes = images * source.num_classes * (2 if args.codec == "float16" else 1)
    print(f"store: {sizes[-1] / 2**20:.2f} MiB on disk, {sizes[-1] / images:.1f} bytes per view "
          f"({logit_bytes / images:.0f} of them logits, the rest view parameters and metadata); "
          f"{sizes[-1] / 2**20 / min(dmp):.1f} MB/s written during the dump")


if __name__ == "__main__":
    main()
