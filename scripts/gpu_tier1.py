"""GPU check, tier 1 (torch, zarr and numcodecs; no DALI): the student modes and the dump on CUDA.

    python scripts/gpu_tier1.py [--fmnist-root DIR] [--epochs 3]

Two workloads, each with random-weight models (speed does not depend on the weights):
- ResNet-32 on fmnist-lt, the default recipe (batch 128, V = 4), the real Fashion-MNIST;
- ResNet-50 at 224 px on in-memory data made here (4,096 long-tailed images over 100 classes, pad-crop,
  flip and colour jitter, batch 256, V = 2): the paper's ImageNet-LT student, without JPEG decoding.

For each it measures, with the benchmarks' own code (benchmarks/measure.py), the median epoch of plain BSCE,
cached DiVE and online DiVE (interleaved), and the cache's dump against the teacher's forward pass on views
already on the GPU, and prints one Markdown table. Targets (GPU): cached / plain <= 1.03; online / cached >=
1.3 for ResNet-50; dump >= 0.95 of forward-only. Also checks the batched in-memory replay on the GPU against
the one-image CPU reference (crops and flips exactly equal). Exits 1 when one is missed, 2 without a GPU.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from measure import dump_rates, model_for, student_epochs, write_cache  # noqa: E402
from pipeline.data.loaders import make_executor  # noqa: E402
from pipeline.data.sources import load_source  # noqa: E402
from pipeline.data.sources.base import Source, Split, longtail_counts  # noqa: E402
from pipeline.data.views import ViewSpec, apply_view, apply_views_batch, view_params  # noqa: E402
from pipeline.settings import cache_settings, student_settings, teacher_settings  # noqa: E402

CACHED_OVER_PLAIN, ONLINE_OVER_CACHED, DUMP_OVER_FORWARD = 1.03, 1.3, 0.95


@dataclass
class Workload:
    name: str
    source: Source
    teacher: object
    cache: object
    student: object
    online_target: bool  # whether online / cached >= 1.3 is a target here (the paper's ResNet-50)


def synthetic_224(n_max: int = 160, classes: int = 100, imbalance: float = 10.0, seed: int = 0) -> Source:
    """Long-tailed in-memory 224 x 224 RGB images: smooth random patterns, a class-coloured tint each."""
    rng = np.random.default_rng(seed)
    counts = longtail_counts(classes, n_max, imbalance)
    labels = np.repeat(np.arange(classes), counts).astype(np.int64)
    coarse = rng.integers(0, 256, (len(labels), 14, 14, 3), dtype=np.uint8)
    images = coarse.repeat(16, axis=1).repeat(16, axis=2)  # 14 x 16 = 224
    tint = rng.integers(0, 64, (classes, 1, 1, 3), dtype=np.uint8)
    images = np.clip(images.astype(np.int16) // 2 + tint[labels], 0, 255).astype(np.uint8)
    ids = np.arange(len(labels), dtype=np.int64)
    train = Split("train", labels, ids, images=images)
    test = Split("test", labels[:classes], ids[:classes], images=images[:classes])
    return Source(name="synthetic-224", num_classes=classes, train=train, test=test,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def workloads(fmnist_root: Path | None, quick: bool) -> list[Workload]:
    """The two workloads; ``quick``: toy sizes (a few hundred fmnist images, 40 at 224 px, batch 16)."""
    source = load_source("fmnist-lt", fmnist_root)
    if quick:
        source = replace(source, train=source.train.subset(np.arange(0, len(source.train), 40)))
    fmnist = Workload("ResNet-32, fmnist-lt", source, teacher_settings("fmnist-lt"),
                      cache_settings("fmnist-lt", ["views=4"]), student_settings("fmnist-lt"), False)
    r50 = ["model=resnet50", f"batch_size={16 if quick else 256}"]
    big = Workload("ResNet-50, 224 px, in memory", synthetic_224(n_max=8, classes=10) if quick else synthetic_224(),
                   teacher_settings("imagenet-lt", [*r50, "aug=pad_crop", "crop_size=224", "pad=16", "jitter=0.4"]),
                   cache_settings("imagenet-lt", ["views=2", "batch_size=512"]),
                   student_settings("imagenet-lt", r50), True)
    return [fmnist, big]


def measure(w: Workload, root: Path, device: torch.device, epochs: int) -> dict:
    spec = w.teacher.view_spec()
    executor = make_executor(w.source.train, spec, w.source.mean, w.source.std, w.student.batch_size,
                             w.student.workers, device)  # in memory: the images live on the GPU
    teacher = model_for(w.teacher, w.source, device).eval()
    dumps = dump_rates(w.source, spec, w.cache, teacher, executor, root, device, repeats=3)
    store = write_cache(spec, w.cache, w.source, teacher, executor, root / "logits.zarr", device)
    med, waits = student_epochs(w.source, spec, w.student, store, teacher, executor, device, epochs)
    return {"med": med, "waits": waits, "dumps": dumps, "images": len(w.source.train)}


def replay_check(device: torch.device) -> tuple[str, bool]:
    """The batched in-memory replay on ``device`` against the one-image CPU reference: crops and flips must be
    equal element for element; with colour jitter the device's arithmetic may round differently (reported,
    checked within 1e-3 pixel levels)."""
    rng = np.random.default_rng(0)
    lines = ["| batched replay on the device vs the CPU reference | max abs diff | verdict |", "|---|---:|---|"]
    passed = True
    for side, channels, size, pad in ((28, 1, 32, 4), (224, 3, 224, 16)):
        images = torch.from_numpy(rng.integers(0, 256, (16, side, side, channels), dtype=np.uint8))
        for jitter in (0.0, 0.4):
            spec = ViewSpec(kind="pad_crop", size=size, pad=pad, jitter=jitter)
            params = view_params(spec, 3, np.arange(16), 1, np.full(16, side), np.full(16, side))
            expected = torch.stack([apply_view(img, p, size) for img, p in zip(images, params)])
            got = apply_views_batch(images.to(device), params, size).cpu()
            diff = (got - expected).abs().max().item()
            ok = diff == 0.0 if jitter == 0 else diff <= 1e-3
            passed &= ok
            what = f"{side} px, {channels} channel(s), pad-crop + flip" + (f", jitter {jitter}" if jitter else "")
            lines.append(f"| {what} | {diff:.2e} | {mark(ok)} ({'exact' if jitter == 0 else 'within 1e-3'}) |")
    return "\n".join(lines), passed


def mark(ok: bool) -> str:
    return "ok" if ok else "**missed**"


def table(rows: list[tuple[Workload, dict]]) -> tuple[str, bool]:
    lines = ["| workload | images | plain s/epoch | cached s/epoch | online s/epoch | cached / plain | "
             "online / cached | forward-only img/s | dump img/s | dump / forward | data wait, cached |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    passed = True
    for w, r in rows:
        med, d = r["med"], r["dumps"]
        cp = med["cached DiVE"] / med["plain BSCE"]
        oc = med["online DiVE"] / med["cached DiVE"]
        df = statistics.median(p / f for p, f in zip(d["dump pipelined"], d["forward"]))
        ok_cp, ok_oc, ok_df = cp <= CACHED_OVER_PLAIN, oc >= ONLINE_OVER_CACHED or not w.online_target, \
            df >= DUMP_OVER_FORWARD
        passed &= ok_cp and ok_oc and ok_df
        wait = float(np.median(r["waits"])) / med["cached DiVE"]
        lines.append(
            f"| {w.name} | {r['images']:,} | {med['plain BSCE']:.2f} | {med['cached DiVE']:.2f} | "
            f"{med['online DiVE']:.2f} | {cp:.3f} {mark(ok_cp)} | {oc:.2f} "
            f"{mark(ok_oc) if w.online_target else '(no target)'} | {statistics.median(d['forward']):,.0f} | "
            f"{statistics.median(d['dump pipelined']):,.0f} | {df:.3f} {mark(ok_df)} | {100 * wait:.1f}% |")
    lines.append("")
    lines.append(f"Targets: cached / plain <= {CACHED_OVER_PLAIN}, online / cached >= {ONLINE_OVER_CACHED} "
                 f"(ResNet-50), dump >= {DUMP_OVER_FORWARD} of forward-only (views already on the GPU).")
    return "\n".join(lines), passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fmnist-root", type=Path, help="Fashion-MNIST IDX files (default: Debian's place)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per mode, after one warm-up")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (slow; to try the script)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and one timed epoch, to try the script")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_tier1: no CUDA GPU is visible to torch; run it on a GPU machine (or --allow-cpu to try it)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="gpu_tier1."))
    rows = []
    try:
        for w in workloads(args.fmnist_root, args.quick):
            rows.append((w, measure(w, root / w.name.split(",")[0], device, 1 if args.quick else args.epochs)))
            print(f"  {w.name}: measured in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text, passed = table(rows)
    replay, replay_ok = replay_check(device)
    passed &= replay_ok
    print(f"### Tier 1: student modes and dump on {name} (torch {torch.__version__})\n")
    print(text)
    print()
    print(replay)
    print(f"\ntier 1: {'PASS' if passed else 'FAIL'} in {time.perf_counter() - start:.0f}s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
