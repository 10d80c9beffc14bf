"""The student stage: DiVE distillation from the cache. The student replays each epoch's cached views and
learns from the cached raw teacher logits; the teacher's weights are never loaded (unless ``mode=online``,
the reference that runs the teacher on the same views instead of reading the store)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Recipe
from pipeline.data import ViewLoader, make_executor
from pipeline.distill import CachedTargets, OnlineTargets
from pipeline.distributed import barrier, init_from_env
from pipeline.losses import DiVELoss
from pipeline.metrics import format_table
from pipeline.ride import Router, evaluate_routed, gflops_per_image, routed_gflops, train_router
from pipeline.sources import load_source
from pipeline.train import fit, make_optimizer, save_checkpoint, unwrap
from store.manifest import MANIFEST, ArtifactError, read_manifest
from store.reader import LogitStore

from .cache import STORE, load_teacher
from .common import CONFIG, derived_recipe, prepare_run_dir, report_from_eval
from .teacher import finish, in_channels, test_loader, trainable_model, with_experts

STUDENT_KEYS = ("tau", "power", "alpha", "model", "epochs", "lr", "seed", "batch_size", "weight_decay",
                "warmup_epochs", "milestones", "gamma", "schedule", "momentum", "eval_every", "bf16",
                "channels_last", "workers", "experts", "router_epochs", "router_threshold")
# RIDE-DiVE (the DiVE paper's multi-expert student): 4 experts, alpha 0.75, tau 3 on ImageNet-LT.
STUDENT_EXPERTS = 4
RIDE_STUDENT_ALPHA = 0.75
RIDE_STUDENT_TAU = {"imagenet-lt": 3.0}
MODES = ("cached", "online")


def student_recipe(cache_dir: Path, overrides: dict) -> Recipe:
    """The cache's (teacher's) recipe with student-time keys replaced. A RIDE student takes RIDE-DiVE's
    defaults (4 experts, alpha 0.75, tau 3 on ImageNet-LT) where ``overrides`` does not say otherwise."""
    config = {**read_manifest(cache_dir, "cache")["config"], "experts": 0}  # the teacher's count is not ours
    recipe = with_experts(derived_recipe(config, overrides, STUDENT_KEYS, "student"), STUDENT_EXPERTS)
    if not recipe.is_ride:
        return recipe
    defaults = {"alpha": RIDE_STUDENT_ALPHA, "tau": RIDE_STUDENT_TAU.get(recipe.dataset, recipe.tau)}
    return replace(recipe, **{k: v for k, v in defaults.items() if k not in overrides})


def open_cache(cache_dir: Path, source) -> LogitStore:
    """The cache's store, read-only, refused unless it was made from this dataset's training split."""
    return LogitStore.open(cache_dir / STORE, expect={"samples": source.fingerprint()})


RESULTS = ("model.pt", "eval.npz", "metrics.json")
ROUTER_RESULTS = ("router.pt", "eval_routed.npz")  # a routed RIDE student's, when there are any


def finished_twin(out: Path, config: dict) -> Path | None:
    """A complete sibling run (another name for the same thing, e.g. ``dive-tau3-p0.5-seed0`` beside
    ``dive-seed0``) whose saved config equals ``config``: training is deterministic, so it is this run."""
    wanted = json.loads(json.dumps(config))
    for sibling in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        if sibling == out or not (sibling / MANIFEST).is_file() or not (sibling / CONFIG).is_file():
            continue
        if json.loads((sibling / CONFIG).read_text()) == wanted and all((sibling / f).is_file() for f in RESULTS):
            return sibling
    return None


def copy_run(src: Path, out: Path) -> None:
    """Copy a finished run's results, then (last, as a stage does) its manifest."""
    for name in (*RESULTS, *(r for r in ROUTER_RESULTS if (src / r).is_file())):
        tmp = out / f".{name}.tmp"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, out / name)
    tmp = out / f".{MANIFEST}.tmp"
    shutil.copyfile(src / MANIFEST, tmp)
    os.replace(tmp, out / MANIFEST)


def routed(recipe: Recipe, source, model, tests, out: Path, device: torch.device, log) -> dict:
    """Train the expert-assignment router with the experts frozen, then test the routed model: accuracy,
    experts consulted and GFLOPs per image. Saves ``router.pt`` and ``eval_routed.npz``."""
    torch.manual_seed(recipe.seed)
    router = Router(model.feature_dim, model.num_experts, source.num_classes,
                    logit_scale=float(model.heads[0].scale)).to(device)
    executor = make_executor(source.train, recipe.view_spec(), source.mean, source.std, recipe.batch_size,
                             recipe.workers, device)
    loader = ViewLoader(source.train, recipe.view_spec(), executor, recipe.batch_size, recipe.seed + 1, train=True)
    log(f"router: {model.num_experts - 1} heads, {recipe.router_epochs} epochs with the experts frozen")
    history = train_router(model, router, loader, recipe.router_epochs, device, recipe.bf16, recipe.channels_last,
                           log=log)
    result = evaluate_routed(model, router, tests.batches(), recipe.router_threshold, device, recipe.bf16,
                             recipe.channels_last)
    np.savez(out / "eval_routed.npz", **result)
    save_checkpoint(out / "router.pt", {"router": router.state_dict(), "history": history})
    report = report_from_eval(result, source.class_counts)
    flops = gflops_per_image(model, (in_channels(source), recipe.crop_size, recipe.crop_size))
    summary = {**{k: report[k] for k in ("top1", "many", "medium", "few")},
               "experts": float(result["experts_used"].mean()), "threshold": recipe.router_threshold,
               "gflops": routed_gflops(flops, router, result["experts_used"])}
    log(f"routed (threshold {recipe.router_threshold:g}): top-1 {summary['top1']:.2f}  Many {summary['many']:.2f}  "
        f"Medium {summary['medium']:.2f}  Few {summary['few']:.2f}  experts {summary['experts']:.2f} of "
        f"{model.num_experts}  {summary['gflops']:.4f} GFLOPs/image (all experts: {flops['total']:.4f})")
    return summary


def run(cache_dir: Path, out: Path, overrides: dict | None = None, mode: str = "cached",
        data_root: Path | None = None, device: str = "auto", log=print) -> dict:
    """Train a DiVE student from ``cache_dir`` into ``out`` and return its test metrics."""
    if mode not in MODES:
        raise ArtifactError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    dist = init_from_env(device)
    recipe = student_recipe(cache_dir, overrides or {})
    cache_manifest = read_manifest(cache_dir, "cache")
    source = load_source(recipe.dataset, data_root, recipe.imbalance)
    store = open_cache(cache_dir, source)
    config = {**recipe.to_dict(), "stage": "student", "mode": mode, "cache": str(cache_dir),
              "cache_fingerprints": store.fingerprints, "world": dist.world}
    if prepare_run_dir(out, config):
        log(f"{out} is complete; nothing to do")
        return read_manifest(out, "student")["metrics"]
    twin = None if (out / "checkpoint.pt").exists() else finished_twin(out, config)
    if twin is not None:
        if dist.main:
            log(f"{twin} is a complete student run of exactly this config (the same cache, settings and seed); "
                f"copying its results into {out} instead of training it again")
            copy_run(twin, out)
        barrier(dist)
        return read_manifest(out, "student")["metrics"]
    if dist.main:
        log(f"student: {recipe.model} from {cache_dir} ({store.n:,} images x {store.v} views), tau {recipe.tau}, "
            f"p {recipe.power}, alpha {recipe.alpha}, {recipe.epochs} epochs, mode {mode}, on {dist.device} x{dist.world}")
    model = trainable_model(recipe, source, dist)
    local_batch = recipe.batch_size // dist.world
    executor = make_executor(source.train, recipe.view_spec(), source.mean, source.std, local_batch,
                             recipe.workers, dist.device)
    if mode == "cached":
        loader = CachedTargets(store, source.train.ids, executor, recipe.batch_size, recipe.seed, dist.rank,
                               dist.world)
    else:
        teacher = load_teacher(Path(cache_manifest["config"]["teacher"]), dist.device, recipe.channels_last)
        loader = OnlineTargets.like(store, source.train, teacher, recipe.view_spec(), executor, recipe.batch_size,
                                    recipe.seed, dist.device, recipe.bf16, recipe.channels_last, dist.rank,
                                    dist.world)
    loss = DiVELoss(torch.as_tensor(source.class_counts), recipe.tau, recipe.power, recipe.alpha).to(dist.device)
    loss_fn = lambda outputs, b: loss(outputs, b.labels.to(dist.device), b.teacher_logits.to(dist.device))  # noqa: E731
    tests = test_loader(recipe, source, dist.device) if dist.main else None
    history = fit(model, loss_fn, loader, recipe, make_optimizer(model, recipe), dist, out / "checkpoint.pt",
                  log=log)
    metrics = {}
    if dist.main:
        extra = {"store_wait_seconds": getattr(loader, "wait_seconds", 0.0)}
        if recipe.is_ride and recipe.experts > 1 and recipe.router_epochs:
            extra["router"] = routed(recipe, source, unwrap(model), tests, out, dist.device, log)
        metrics = finish(recipe, source, unwrap(model), tests, out, history, config, dist.device, log,
                         stage="student", name=f"student ({'RIDE-' if recipe.is_ride else ''}DiVE, {mode})",
                         inputs={"cache": json.dumps(store.fingerprints, sort_keys=True)}, extra=extra)
        teacher_dir = Path(cache_manifest["config"]["teacher"])
        if (teacher_dir / "metrics.json").is_file():
            teacher = json.loads((teacher_dir / "metrics.json").read_text())
            log(format_table({"teacher": teacher, f"student ({mode})": metrics}))
    barrier(dist)
    return metrics
