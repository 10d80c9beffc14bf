"""The teacher stage: train a backbone with Balanced Softmax (or plain CE), evaluate it, and write
``model.pt``, ``metrics.json``, ``eval.npz`` and, last, ``manifest.json``."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.data.loaders import ViewLoader, make_executor, test_loader
from pipeline.data.sources import load_source
from pipeline.settings import TeacherSettings, defaults_for, lr_reason
from pipeline.train.distributed import barrier, init_from_env
from pipeline.train.errors import TrainingDiverged
from pipeline.train.loop import diverged_message, evaluate, fit, make_optimizer, unwrap
from pipeline.train.losses import build_teacher_loss
from pipeline.train.setup import micro_batch_for, trainable_model
from store.manifest import read_manifest

from .artifacts import finish, prepare_run_dir, report_from_eval, runtime_record


def identity(settings: TeacherSettings) -> dict:
    """What a teacher run is: its settings without the runtime keys."""
    return {"stage": "teacher", "teacher": settings.identity()}


def run(settings: TeacherSettings, out: Path, data_root: Path | None = None, device: str = "auto",
        log=print) -> dict:
    """Train the teacher into ``out`` (resuming if a checkpoint is there) and return its test metrics."""
    dist = init_from_env(device)
    source = load_source(settings.dataset, data_root, settings.imbalance, settings.classes)
    recipe = defaults_for(settings.dataset).teacher  # what the lr and the divergence messages compare against
    if prepare_run_dir(out, identity(settings)):
        log(f"{out} is complete; nothing to do")
        return read_manifest(out, "teacher")["metrics"]
    if dist.main:
        counts = source.class_counts
        experts = f"{settings.experts} experts, " if settings.is_ride else ""
        log(f"teacher: {settings.dataset} ({len(source.train)} train / {len(source.test)} test images, "
            f"{source.num_classes} classes, counts {counts.max()}..{counts.min()}), {settings.model}, {experts}"
            f"loss {settings.loss}, {settings.epochs} epochs, batch {settings.batch_size}, on {dist.device} "
            f"x{dist.world}")
        log(f"teacher: {lr_reason(settings, recipe)}")
    model = trainable_model(settings, source, dist)
    spec = settings.view_spec()
    local_batch = settings.batch_size // dist.world
    executor = make_executor(source.train, spec, source.mean, source.std, local_batch, settings.workers, dist.device)
    loader = ViewLoader(source.train, spec, executor, settings.batch_size, settings.seed, train=True,
                        rank=dist.rank, world=dist.world, prefetch=settings.prefetch)
    loss = build_teacher_loss(settings.loss, torch.as_tensor(source.class_counts), settings.is_ride,
                              settings.diversity)
    if hasattr(loss, "to"):
        loss = loss.to(dist.device)
    loss_fn = lambda outputs, batch: loss(outputs, batch.labels.to(dist.device))  # noqa: E731
    tests = test_loader(source, spec, settings.workers, dist.device, prefetch=settings.prefetch) if dist.main else None

    def eval_now(epoch: int) -> dict:
        if not dist.main:
            return {}
        rep = report_from_eval(evaluate(unwrap(model), tests.batches(), dist.device, settings.bf16,
                                        settings.channels_last, keep_features=False), source.class_counts)
        return {k: rep[k] for k in ("top1", "many", "medium", "few")}

    def explain(detail: str) -> str:
        return diverged_message("teacher", settings, recipe, detail)

    micro = micro_batch_for("teacher", settings, model, loss_fn, source, spec.size, dist, False, log)
    try:
        history = fit(model, loss_fn, loader, settings, make_optimizer(model, settings), dist, out / "checkpoint.pt",
                      eval_now, log, micro)
    except TrainingDiverged as error:
        raise TrainingDiverged(explain(str(error))) from None
    metrics = {}
    if dist.main:
        config = {**identity(settings), "runtime": runtime_record(settings, dist, micro_batch_used=micro)}
        metrics = finish(settings, source, unwrap(model), tests, out, history, config, dist.device, log,
                         stage="teacher", name=f"teacher ({settings.loss})", explain=explain)
    barrier(dist)
    return metrics
