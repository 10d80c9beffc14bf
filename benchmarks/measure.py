"""Measurements the benchmarks and the GPU check share: student epochs by mode, and the dump against forward.

Each takes the device, so the same code times the CPU here (``make bench-student``, ``make bench-loader``) and
a GPU in ``make gpu-check``. On CUDA the clock is read after ``torch.cuda.synchronize``.
"""
from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.data.loaders import ViewLoader
from pipeline.data.targets import CachedTargets, OnlineTargets, row_order
from pipeline.models import build_model
from pipeline.train.distributed import Dist
from pipeline.train.losses import BalancedSoftmax, DiVELoss
from pipeline.train.loop import make_optimizer, train_one_epoch
from stages.cache import dump, shard_batches, teacher_logits
from store.reader import LogitStore
from store.writer import StoreWriter

MODES = ("plain BSCE", "cached DiVE", "online DiVE")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_for(settings, source, device: torch.device, model: str | None = None) -> torch.nn.Module:
    """A freshly initialized model of the settings (or ``model``) on ``device``; speed does not depend on
    its weights."""
    torch.manual_seed(0)
    net = build_model(model or settings.model, source.num_classes, source.in_channels).to(device)
    return net.to(memory_format=torch.channels_last) if settings.channels_last else net


def new_writer(path: Path, source, cache) -> StoreWriter:
    shutil.rmtree(path, ignore_errors=True)
    rows = row_order(len(source.train), cache.view_seed)
    attrs = {"recipe": cache.to_dict(), "view_spec": {}, "fingerprints": {}, "view_seed": cache.view_seed}
    return StoreWriter.create_or_resume(path, len(source.train), cache.views, source.num_classes, cache.codec,
                                        source.train.labels[rows], source.train.ids[rows], source.class_counts,
                                        attrs)


def write_cache(spec, cache, source, teacher, executor, path: Path, device: torch.device) -> LogitStore:
    """A complete store of ``teacher``'s logits over the cache's views, written by the stage's ``dump``."""
    writer = new_writer(path, source, cache)
    dump(spec, cache, teacher, executor, writer, row_order(len(source.train), cache.view_seed), Dist(device=device),
         log=lambda *a, **k: None)
    writer.mark_complete()
    return LogitStore.open(path)


def student_epochs(source, spec, recipe, store: LogitStore, teacher, executor, device: torch.device,
                   epochs: int) -> tuple[dict[str, float], list[float]]:
    """Median epoch seconds of plain BSCE, cached DiVE and online DiVE (same model, data, batch and views),
    interleaved epoch by epoch so that load hits them alike; epoch 0 warms up and is not counted. Also the
    seconds cached DiVE waited for data in each counted epoch."""
    counts = torch.as_tensor(source.class_counts)
    bsce = BalancedSoftmax(counts).to(device)
    dive = DiVELoss(counts, recipe.tau, recipe.power, recipe.alpha).to(device)
    cached = CachedTargets(store, source.train.ids, executor, recipe.batch_size, 0, prefetch=recipe.prefetch)
    loaders = {
        "plain BSCE": ViewLoader(source.train, spec, executor, recipe.batch_size, 0, train=True,
                                 prefetch=recipe.prefetch),
        "cached DiVE": cached,
        "online DiVE": OnlineTargets.like(store, source.train, teacher, spec, executor, recipe.batch_size, 0, device,
                                          recipe.bf16, recipe.channels_last, prefetch=recipe.prefetch)}
    losses = {"plain BSCE": lambda o, b: bsce(o, b.labels.to(device)),
              "cached DiVE": lambda o, b: dive(o, b.labels.to(device), b.teacher_logits.to(device)),
              "online DiVE": lambda o, b: dive(o, b.labels.to(device), b.teacher_logits.to(device))}
    models = {name: model_for(recipe, source, device) for name in MODES}
    optimizers = {name: make_optimizer(models[name], recipe) for name in MODES}
    times: dict[str, list[float]] = {name: [] for name in MODES}
    waits: list[float] = []
    for epoch in range(epochs + 1):
        for name in MODES:
            before = cached.wait_seconds
            synchronize(device)
            start = time.perf_counter()
            train_one_epoch(models[name], losses[name], loaders[name].batches(epoch), optimizers[name], recipe.lr,
                            device, recipe.bf16, recipe.channels_last, Dist(device=device))
            synchronize(device)
            if epoch:
                times[name].append(time.perf_counter() - start)
                if name == "cached DiVE":
                    waits.append(cached.wait_seconds - before)
    return {name: statistics.median(t) for name, t in times.items()}, waits


def dump_rates(source, spec, cache, model, executor, root: Path, device: torch.device, repeats: int,
               ranks: int = 1) -> dict[str, list[float]]:
    """Images/s, in each of ``repeats`` rounds, of: the views alone (read, decode, replay); the teacher's forward on
    those views already resident on ``device``; and the stage's ``dump`` of the same shards into a fresh
    store, synchronous (prefetch=0) and pipelined (the cache settings' prefetch, at least 1). With ``ranks``
    > 1 only rank 0's share of the shards is timed, to bound the time."""
    dist = Dist(rank=0, world=ranks, device=device)
    rows = row_order(len(source.train), cache.view_seed)
    shards = new_writer(root / "plan.zarr", source, cache).missing_shards(dist.rank, dist.world)
    resident = [part.images.to(device) for part in shard_batches(spec, cache, executor, rows, shards)]
    images = sum(len(x) for x in resident)
    runs: dict[str, list[float]] = {"views": [], "forward": [], "dump sync": [], "dump pipelined": []}
    for r in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        made = sum(len(part.images) for part in shard_batches(spec, cache, executor, rows, shards))
        synchronize(device)
        runs["views"].append(made / (time.perf_counter() - start))
        start = time.perf_counter()
        for x in resident:
            teacher_logits(model, x, cache, device)  # returns host arrays: the clock stops after the device
        runs["forward"].append(images / (time.perf_counter() - start))
        for label, prefetch in (("dump sync", 0), ("dump pipelined", max(1, cache.prefetch))):
            writer = new_writer(root / f"dump{r}-{prefetch}.zarr", source, cache)
            start = time.perf_counter()
            done = dump(spec, replace(cache, prefetch=prefetch), model, executor, writer, rows, dist,
                        log=lambda *a, **k: None)
            runs[label].append(done / (time.perf_counter() - start))
    return runs
