"""Does the loader keep the step busy? ``make bench-loader``: the data path with and without prefetching.

    python benchmarks/bench_loader.py [--steps 30] [--repeats 2]

For two datasets, side by side in one process, with one decode thread and one compute thread (so that both can
run at once on a 2-core machine):

- **fmnist-lt**, in memory: the teacher's recipe (ResNet-32, batch 128), views replayed by torch;
- **JPEG**: an ImageNet-LT-format tree of 384 px JPEGs that this benchmark writes from Debian's real photos
  (opencv-doc, libjxl-testdata), decoded and viewed by DALI on the CPU (random resized crops to 32 px with
  colour jitter) for a ResNet-32 at batch 64. At this size the loader alone and the step alone are within 2x
  of each other, where a serial path loses most and the figure can tell the two apart.

It measures images/s of the loader alone (batches made and dropped), the training step alone (on batches
already resident), and the two together through the stage's own ``train_one_epoch``: synchronous
(``prefetch=0``, the path before prefetching) and pipelined (``prefetch=2``). Overlap efficiency =
together / min(loader alone, step alone); the target for the pipelined path is >= 0.9. Then the cache's
``dump`` (teacher forward, store encode and write) against the teacher's forward on resident tensors, the
dump's real limit (target >= 0.9). Every measurement is repeated (``--repeats``), the paths back to back in
each repeat; images/s are medians, and each ratio is the median of the repeats' own ratios, so that a burst
of load on this shared machine moves a repeat, not the verdict.
"""
from __future__ import annotations

import argparse
import itertools
import os
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
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))
from pipeline.data.loaders import ViewLoader, make_executor, one_cpu_thread  # noqa: E402
from pipeline.data.sources import load_source  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.settings import cache_settings, teacher_settings  # noqa: E402
from pipeline.train.distributed import Dist  # noqa: E402
from pipeline.train.losses import build_teacher_loss  # noqa: E402
from pipeline.train.loop import make_optimizer, train_one_epoch  # noqa: E402
from photo_data import write_jpeg_tree  # noqa: E402  (an ImageNet-LT tree of real Debian photos)
from measure import dump_rates, model_for  # noqa: E402

CPU = torch.device("cpu")
TARGET_OVERLAP, TARGET_DUMP = 0.9, 0.9
JPEG_SIDE = 384
STEPS = 40
JPEG_RECIPE = ["model=resnet32", "crop_size=32", "resize=36", "jitter=0.4", "batch_size=64", "workers=1"]
DUMP_RANKS = 4  # the dump is timed over one rank's share of the shards (rank 0 of 4), to bound its time


@dataclass
class Case:
    name: str
    source: object
    teacher: object  # TeacherSettings
    cache: object  # CacheSettings
    executor: object = None  # one per case, so image headers are read once, as in a run's later epochs

    def __post_init__(self) -> None:
        t = self.teacher
        self.executor = make_executor(self.source.train, t.view_spec(), self.source.mean, self.source.std,
                                      max(t.batch_size, self.cache.batch_size), t.workers, CPU)
        self.executor.sizes(np.arange(len(self.source.train)))


def cases(jpeg_root: Path) -> list[Case]:
    fmnist = teacher_settings("fmnist-lt", ["workers=1"])
    jpeg = teacher_settings("imagenet-lt", JPEG_RECIPE)
    return [Case("fmnist-lt (in memory, torch views)", load_source("fmnist-lt"), fmnist,
                 cache_settings("fmnist-lt", ["views=2", "workers=1", "batch_size=256"])),
            Case(f"JPEG {JPEG_SIDE} px (DALI CPU decode)", load_source("imagenet-lt", jpeg_root), jpeg,
                 cache_settings("imagenet-lt", ["views=2", "workers=1", "batch_size=128"]))]


# --- the measurements ----------------------------------------------------------------------------------


def loader_for(case: Case, prefetch: int) -> ViewLoader:
    t = case.teacher
    return ViewLoader(case.source.train, t.view_spec(), case.executor, t.batch_size, t.seed, train=True,
                      prefetch=prefetch)


def first_batches(loader: ViewLoader, epoch: int, steps: int):
    """``steps`` batches from the start of ``epoch`` (into the epochs after it where one is shorter); each
    epoch's loader (and any thread of it) is closed once its batches are taken."""
    for e in itertools.count(epoch):
        batches = loader.batches(e)
        try:
            for batch in batches:
                if steps == 0:
                    return
                steps -= 1
                yield batch
        finally:
            batches.close()
        if steps == 0:
            return


def loader_alone(case: Case, steps: int, epoch: int) -> float:
    loader = loader_for(case, prefetch=0)
    start, seen = time.perf_counter(), 0
    for batch in first_batches(loader, epoch, steps):
        seen += len(batch.labels)
    return seen / (time.perf_counter() - start)


class Trainer:
    """The teacher's model, loss and optimizer, kept across measurements (its weights keep training)."""

    def __init__(self, case: Case):
        t = case.teacher
        torch.manual_seed(0)
        self.model = build_model(t.model, case.source.num_classes, case.source.in_channels)
        self.model = self.model.to(memory_format=torch.channels_last) if t.channels_last else self.model
        loss = build_teacher_loss(t.loss, torch.as_tensor(case.source.class_counts), t.is_ride, t.diversity)
        self.loss_fn = lambda outputs, batch: loss(outputs, batch.labels)  # noqa: E731
        self.optimizer = make_optimizer(self.model, replace(t, lr=0.01))
        self.settings = t


def train_rate(trainer: Trainer, batches) -> float:
    """Images/s of the stage's own training loop over ``batches``."""
    t = trainer.settings
    stats = train_one_epoch(trainer.model, trainer.loss_fn, batches, trainer.optimizer, 0.01, CPU, t.bf16,
                            t.channels_last, Dist(device=CPU))
    return stats["images_per_s"]


def training_rates(case: Case, steps: int, repeats: int) -> dict[str, list[float]]:
    """Per repeat r (on epoch r): loader alone, step alone (the same loop over the same batches made beforehand
    and held in memory), and both together, synchronous and pipelined; measured back to back, so that each
    repeat's ratios compare runs made under the same machine load."""
    trainer = Trainer(case)
    train_rate(trainer, list(first_batches(loader_for(case, 0), 99, 3)))  # warm-up: allocations, kernel choices
    runs: dict[str, list[float]] = {"loader": [], "step": [], "sync": [], "pipelined": []}
    for epoch in range(repeats):
        runs["loader"].append(loader_alone(case, steps, epoch))
        resident = list(first_batches(loader_for(case, 0), epoch, steps))
        runs["step"].append(train_rate(trainer, resident))
        del resident
        runs["sync"].append(train_rate(trainer, first_batches(loader_for(case, 0), epoch, steps)))
        runs["pipelined"].append(train_rate(trainer, first_batches(loader_for(case, 2), epoch, steps)))
    return runs


def median(values) -> float:
    return float(statistics.median(values))


def overlap(runs: dict[str, list[float]], path: str) -> float:
    """Median over repeats of together / min(loader alone, step alone)."""
    return median(t / min(a, b) for t, a, b in zip(runs[path], runs["loader"], runs["step"]))


def ratio(runs: dict[str, list[float]], num: str, *dens: str) -> float:
    """Median over repeats of ``num`` / min(``dens``)."""
    return median(runs[num][i] / min(runs[d][i] for d in dens) for i in range(len(runs[num])))


# --- the report ------------------------------------------------------------------------------------------


def report(name: str, train: dict[str, list[float]], dumps: dict[str, list[float]]) -> list[str]:
    """Markdown tables of one dataset: median images/s, and ratios as medians of each repeat's ratio."""
    alone = ratio(train, "loader", "step")
    spread = max(alone, 1 / alone)
    lines = [f"### {name}", "",
             f"loader alone / step alone = {alone:.2f}"
             f"{'' if spread <= 2 else '  (not within 2x: overlap cannot show much here)'}", "",
             "| measure | images/s | overlap efficiency |", "|---|---:|---:|",
             f"| loader alone | {median(train['loader']):,.0f} | |",
             f"| step alone (resident batches) | {median(train['step']):,.0f} | |",
             f"| together, synchronous (prefetch=0) | {median(train['sync']):,.0f} | {overlap(train, 'sync'):.3f} |",
             f"| together, pipelined (prefetch=2) | {median(train['pipelined']):,.0f} | "
             f"{overlap(train, 'pipelined'):.3f} |",
             "", "| cache dump | images/s | / forward on resident tensors | / min(views alone, forward) |",
             "|---|---:|---:|---:|",
             f"| views alone (read, decode, replay) | {median(dumps['views']):,.0f} | | |",
             f"| teacher forward, resident | {median(dumps['forward']):,.0f} | 1.000 | |"]
    for label in ("dump sync", "dump pipelined"):
        lines.append(f"| {label} | {median(dumps[label]):,.0f} | {ratio(dumps, label, 'forward'):.3f} | "
                     f"{ratio(dumps, label, 'views', 'forward'):.3f} |")
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every measurement (medians reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one compute thread; the loader gets one decode thread (DALI) or one_cpu_thread
    one_cpu_thread()
    root = Path(tempfile.mkdtemp(prefix="bench_loader."))
    verdicts = []
    try:
        # a whole epoch of JPEGs per measurement: the loader restarts (and refills) at each epoch's start
        jpegs = args.steps * teacher_settings("imagenet-lt", JPEG_RECIPE).batch_size
        all_cases = cases(write_jpeg_tree(root / "jpeg", jpegs, JPEG_SIDE))
        print(f"loader benchmark: {os.cpu_count()} CPUs, 1 compute thread + 1 decode thread, {args.steps} steps "
              f"per measurement, medians of {args.repeats} repeats; load average {os.getloadavg()[0]:.1f}\n")
        for case in all_cases:
            train = training_rates(case, args.steps, args.repeats)
            teacher = model_for(case.cache, case.source, CPU, case.teacher.model).eval()
            dumps = dump_rates(case.source, case.teacher.view_spec(), case.cache, teacher, case.executor, root, CPU,
                               args.repeats, ranks=DUMP_RANKS)
            print("\n".join(report(case.name, train, dumps)), flush=True)
            verdicts.append((case.name, overlap(train, "sync"), overlap(train, "pipelined"),
                             ratio(dumps, "dump pipelined", "forward"),
                             ratio(dumps, "dump pipelined", "views", "forward")))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| dataset | overlap, synchronous | overlap, pipelined | dump / forward | dump / min(views, forward) |")
    print("|---|---:|---:|---:|---:|")
    for name, sync, piped, dumped, bounded in verdicts:
        print(f"| {name} | {sync:.3f} | {piped:.3f}{'' if piped >= TARGET_OVERLAP else ' (below 0.9)'} | "
              f"{dumped:.3f}{'' if dumped >= TARGET_DUMP else ' (below 0.9)'} | {bounded:.3f} |")
    print(f"\ntargets: pipelined overlap >= {TARGET_OVERLAP}; dump >= {TARGET_DUMP} of forward on resident tensors "
          f"where the views are not the slower part (with one decode thread, JPEG views are slower than the "
          f"forward pass, so there the dump's limit is the views)")


if __name__ == "__main__":
    main()
