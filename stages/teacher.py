"""The teacher stage: train a backbone with Balanced Softmax (or plain CE), evaluate it, and write
``model.pt``, ``metrics.json``, ``eval.npz`` and, last, ``manifest.json``."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Recipe
from pipeline.data import ViewLoader, make_executor
from pipeline.distributed import Dist, barrier, init_from_env
from pipeline.losses import build_teacher_loss
from pipeline.metrics import format_table
from pipeline.models import build_model
from pipeline.ride import gflops_per_image
from pipeline.sources import Source, load_source
from pipeline.train import evaluate, fit, make_optimizer, save_checkpoint, unwrap
from store.manifest import read_manifest, sha256_file, write_json_atomic, write_manifest

from .common import prepare_run_dir, recipe_config, report_from_eval


def in_channels(source: Source) -> int:
    return source.train.images.shape[-1] if source.train.in_memory else 3


def build_for(recipe: Recipe, source: Source) -> torch.nn.Module:
    """The recipe's model for this source, seeded so every rank starts from the same weights."""
    torch.manual_seed(recipe.seed)
    return build_model(recipe.model, source.num_classes, in_channels(source), recipe.experts)


TEACHER_EXPERTS = 6  # a RIDE teacher's experts unless experts= says otherwise


def with_experts(recipe: Recipe, default: int) -> Recipe:
    """A RIDE recipe with ``experts`` resolved (0 means the stage's default); other models have none."""
    if not recipe.is_ride:
        return replace(recipe, experts=0)
    return recipe if recipe.experts else replace(recipe, experts=default)


def trainable_model(recipe: Recipe, source: Source, dist: Dist) -> torch.nn.Module:
    """The recipe's model on this rank's device, channels_last if asked, wrapped in DDP under torchrun."""
    model = build_for(recipe, source).to(dist.device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.nn.parallel.DistributedDataParallel(model) if dist.active else model


def test_loader(recipe: Recipe, source: Source, device: torch.device, batch_size: int = 500) -> ViewLoader:
    spec = recipe.view_spec()
    executor = make_executor(source.test, spec, source.mean, source.std, batch_size, recipe.workers, device)
    return ViewLoader(source.test, spec, executor, batch_size, recipe.seed, train=False)


def run(recipe: Recipe, out: Path, data_root: Path | None = None, device: str = "auto", log=print) -> dict:
    """Train the teacher into ``out`` (resuming if a checkpoint is there) and return its test metrics."""
    dist = init_from_env(device)
    recipe = with_experts(recipe, TEACHER_EXPERTS)
    source = load_source(recipe.dataset, data_root, recipe.imbalance)
    config = recipe_config(recipe, stage="teacher", world=dist.world)
    if prepare_run_dir(out, config):
        log(f"{out} is complete; nothing to do")
        return read_manifest(out, "teacher")["metrics"]
    if dist.main:
        counts = source.class_counts
        log(f"teacher: {recipe.dataset} ({len(source.train)} train / {len(source.test)} test images, "
            f"{source.num_classes} classes, counts {counts.max()}..{counts.min()}), {recipe.model}, "
            f"{f'{recipe.experts} experts, ' if recipe.is_ride else ''}loss {recipe.loss}, {recipe.epochs} epochs, batch {recipe.batch_size}, on {dist.device} x{dist.world}")
    model = trainable_model(recipe, source, dist)
    spec = recipe.view_spec()
    local_batch = recipe.batch_size // dist.world
    executor = make_executor(source.train, spec, source.mean, source.std, local_batch, recipe.workers, dist.device)
    loader = ViewLoader(source.train, spec, executor, recipe.batch_size, recipe.seed, train=True,
                        rank=dist.rank, world=dist.world)
    loss = build_teacher_loss(recipe.loss, torch.as_tensor(source.class_counts), recipe.is_ride, recipe.diversity)
    if hasattr(loss, "to"):
        loss = loss.to(dist.device)
    loss_fn = lambda outputs, batch: loss(outputs, batch.labels.to(dist.device))  # noqa: E731
    tests = test_loader(recipe, source, dist.device) if dist.main else None

    def eval_now(epoch: int) -> dict:
        if not dist.main:
            return {}
        rep = report_from_eval(evaluate(unwrap(model), tests.batches(), dist.device, recipe.bf16,
                                        recipe.channels_last, keep_features=False), source.class_counts)
        return {k: rep[k] for k in ("top1", "many", "medium", "few")}

    history = fit(model, loss_fn, loader, recipe, make_optimizer(model, recipe), dist, out / "checkpoint.pt",
                  eval_now, log)
    metrics = {}
    if dist.main:
        metrics = finish(recipe, source, unwrap(model), tests, out, history, config, dist.device, log)
    barrier(dist)
    return metrics


def finish(recipe: Recipe, source: Source, model, tests: ViewLoader, out: Path, history: list, config: dict,
           device: torch.device, log, stage: str = "teacher", name: str | None = None,
           inputs: dict | None = None, extra: dict | None = None) -> dict:
    """Evaluate the final weights, write the outputs and, last, the manifest (teacher and student alike)."""
    result = evaluate(model, tests.batches(), device, recipe.bf16, recipe.channels_last)
    report = report_from_eval(result, source.class_counts)
    np.savez(out / "eval.npz", **result)
    save_checkpoint(out / "model.pt", {"model": model.state_dict(), "model_name": recipe.model,
                                       "num_classes": source.num_classes, "in_channels": in_channels(source),
                                       "config": recipe.to_dict()})
    shape = (in_channels(source), recipe.crop_size, recipe.crop_size)
    flops = gflops_per_image(model, shape)
    metrics = {**report, "class_counts": source.class_counts.tolist(), "history": history, "gflops": flops,
               "experts": recipe.experts or 1, **(extra or {})}
    write_json_atomic(out / "metrics.json", metrics)
    log(format_table({name or f"teacher ({recipe.loss})": report}))
    summary = {**{k: report[k] for k in ("top1", "many", "medium", "few")}, "gflops": flops["total"],
               "experts": recipe.experts or 1}
    if extra and "router" in extra:  # a routed RIDE student: its routed figures go in the manifest too
        summary["router"] = extra["router"]
    write_manifest(out, stage, config,
                   inputs={"train_samples": source.fingerprint(), "test_samples": source.test.fingerprint(),
                           **(inputs or {})},
                   outputs={"model.pt": sha256_file(out / "model.pt"), "eval.npz": sha256_file(out / "eval.npz")},
                   extra={"metrics": summary})
    return summary
