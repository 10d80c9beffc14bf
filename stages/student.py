"""The student stage: DiVE distillation from the cache. The student replays each epoch's cached views and
learns from the cached raw teacher logits; the teacher's weights are never loaded (unless ``mode=online``,
the reference that runs the teacher on the same views instead of reading the store).

A student's settings are its own (``pipeline.settings.StudentSettings``): its batch, lr and epochs never
come from the teacher or the cache. What it takes from upstream is the data: the dataset, the training views
(from the teacher's settings) and the stored logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.data.loaders import ViewLoader, make_executor, test_loader
from pipeline.data.sources import load_source
from pipeline.data.targets import CachedTargets, OnlineTargets
from pipeline.data.views import ViewSpec
from pipeline.models.flops import gflops_per_image
from pipeline.models.router import Router, routed_gflops
from pipeline.settings import StudentSettings, TeacherSettings, defaults_for, lr_reason
from pipeline.train.distributed import barrier, init_from_env
from pipeline.train.errors import TrainingDiverged
from pipeline.train.loop import diverged_message, fit, make_optimizer, save_checkpoint, unwrap
from pipeline.train.losses import DiVELoss
from pipeline.train.metrics import format_table
from pipeline.train.router import evaluate_routed, train_router
from pipeline.train.setup import micro_batch_for, trainable_model
from store.manifest import read_manifest
from store.reader import LogitStore

from .artifacts import (finish, store_of, load_teacher, prepare_run_dir, report_from_eval, runtime_record,
                        settings_of)


def cache_teacher(cache_dir: Path) -> TeacherSettings:
    """The settings of the teacher a complete cache was made from (its dataset, split and views)."""
    return settings_of(read_manifest(cache_dir, "cache")["config"], "teacher")


def teacher_dir_of(cache_config: dict) -> Path:
    """The folder of the teacher a cache (its manifest's config) was made from; caches made before per-stage
    settings kept it under ``teacher``."""
    return Path(cache_config.get("teacher_dir") or cache_config["teacher"])


def open_cache(cache_dir: Path, source, sharpness: float | None = None) -> LogitStore:
    """The cache's store, read-only, refused unless it was made from this dataset's training split;
    ``sharpness`` (p / tau) is what a topk store decodes its logits for."""
    return LogitStore.open(store_of(cache_dir), expect={"samples": source.fingerprint()}, sharpness=sharpness)


def identity(student: StudentSettings, cache_config: dict, store: LogitStore) -> dict:
    """What a student is: its settings without the runtime keys, and the cache it learns from."""
    return {"stage": "student", "student": student.identity(), "teacher": cache_config["teacher"],
            "cache": cache_config.get("cache", {}), "cache_fingerprints": store.fingerprints}


def routed(student: StudentSettings, spec: ViewSpec, source, model, tests, out: Path, device: torch.device,
           log) -> dict:
    """Train the expert-assignment router with the experts frozen, then test the routed model: accuracy,
    experts consulted and GFLOPs per image. Saves ``router.pt`` and ``eval_routed.npz``."""
    torch.manual_seed(student.seed)
    router = Router(model.feature_dim, model.num_experts, source.num_classes,
                    logit_scale=float(model.heads[0].scale)).to(device)
    executor = make_executor(source.train, spec, source.mean, source.std, student.batch_size, student.workers, device)
    loader = ViewLoader(source.train, spec, executor, student.batch_size, student.seed + 1, train=True,
                        prefetch=student.prefetch)
    log(f"router: {model.num_experts - 1} heads, {student.router_epochs} epochs with the experts frozen")
    history = train_router(model, router, loader, student.router_epochs, device, student.bf16,
                           student.channels_last, log=log)
    result = evaluate_routed(model, router, tests.batches(), student.router_threshold, device, student.bf16,
                             student.channels_last)
    np.savez(out / "eval_routed.npz", **result)
    save_checkpoint(out / "router.pt", {"router": router.state_dict(), "history": history})
    report = report_from_eval(result, source.class_counts)
    flops = gflops_per_image(model, (source.in_channels, spec.size, spec.size))
    summary = {**{k: report[k] for k in ("top1", "many", "medium", "few")},
               "experts": float(result["experts_used"].mean()), "threshold": student.router_threshold,
               "gflops": routed_gflops(flops, router, result["experts_used"])}
    log(f"routed (threshold {student.router_threshold:g}): top-1 {summary['top1']:.2f}  Many {summary['many']:.2f}  "
        f"Medium {summary['medium']:.2f}  Few {summary['few']:.2f}  experts {summary['experts']:.2f} of "
        f"{model.num_experts}  {summary['gflops']:.4f} GFLOPs/image (all experts: {flops['total']:.4f})")
    return summary


def run(cache_dir: Path, out: Path, student: StudentSettings, data_root: Path | None = None,
        device: str = "auto", log=print) -> dict:
    """Train a DiVE student from ``cache_dir`` into ``out`` and return its test metrics."""
    dist = init_from_env(device)
    cache_config = read_manifest(cache_dir, "cache")["config"]
    teacher = settings_of(cache_config, "teacher")
    source = load_source(teacher.dataset, data_root, teacher.imbalance, teacher.classes)
    recipe = defaults_for(teacher.dataset).student  # what the lr and the divergence messages compare against
    store = open_cache(cache_dir, source, student.power / student.tau)
    ident = identity(student, cache_config, store)
    if prepare_run_dir(out, ident):
        log(f"{out} is complete; nothing to do")
        return read_manifest(out, "student")["metrics"]
    mode = student.mode
    if dist.main:
        log(f"student: {student.model} from {cache_dir} ({store.n:,} images x {store.v} views), tau {student.tau}, "
            f"p {student.power}, alpha {student.alpha}, {student.epochs} epochs, batch {student.batch_size}, "
            f"mode {mode}, on {dist.device} x{dist.world}")
        log(f"student: {lr_reason(student, recipe)}")
    model = trainable_model(student, source, dist)
    spec = teacher.view_spec()
    local_batch = student.batch_size // dist.world
    executor = make_executor(source.train, spec, source.mean, source.std, local_batch, student.workers, dist.device)
    if mode == "cached":
        loader = CachedTargets(store, source.train.ids, executor, student.batch_size, student.seed, dist.rank,
                               dist.world, student.prefetch)
    else:
        teacher_model = load_teacher(teacher_dir_of(cache_config), dist.device, student.channels_last)
        loader = OnlineTargets.like(store, source.train, teacher_model, spec, executor, student.batch_size,
                                    student.seed, dist.device, student.bf16, student.channels_last, dist.rank,
                                    dist.world, student.prefetch)
    loss = DiVELoss(torch.as_tensor(source.class_counts), student.tau, student.power, student.alpha).to(dist.device)
    loss_fn = lambda outputs, b: loss(outputs, b.labels.to(dist.device), b.teacher_logits.to(dist.device))  # noqa: E731
    tests = test_loader(source, spec, student.workers, dist.device, prefetch=student.prefetch) if dist.main else None
    micro = micro_batch_for("student", student, model, loss_fn, source, spec.size, dist, True, log)
    try:
        history = fit(model, loss_fn, loader, student, make_optimizer(model, student), dist, out / "checkpoint.pt",
                      log=log, micro_batch=micro)
    except TrainingDiverged as error:
        raise TrainingDiverged(diverged_message("student", student, recipe, str(error))) from None
    metrics = {}
    if dist.main:
        extra = {"data_wait_seconds": getattr(loader, "wait_seconds", 0.0)}
        if student.is_ride and student.experts > 1 and student.router_epochs:
            extra["router"] = routed(student, spec, source, unwrap(model), tests, out, dist.device, log)
        config = {**ident, "runtime": runtime_record(student, dist, micro_batch_used=micro),
                  "cache_dir": str(cache_dir)}
        metrics = finish(student, source, unwrap(model), tests, out, history, config, dist.device, log,
                         stage="student", name=f"student ({'RIDE-' if student.is_ride else ''}DiVE, {mode})",
                         inputs={"cache": json.dumps(store.fingerprints, sort_keys=True)}, extra=extra)
        teacher_metrics = teacher_dir_of(cache_config) / "metrics.json"
        if teacher_metrics.is_file():
            log(format_table({"teacher": json.loads(teacher_metrics.read_text()), f"student ({mode})": metrics}))
    barrier(dist)
    return metrics
