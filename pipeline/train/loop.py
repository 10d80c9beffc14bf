"""The one training loop, shared by teacher and student: the loss is the only difference.

Modelled on torchvision's reference script: ``train_one_epoch`` and ``evaluate`` are small top-level
functions and a checkpoint is a plain dict of tensors and plain data, loaded with ``weights_only=True``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.device import autocast, to_device
from pipeline.settings import MAKE_VARIABLES, Training, lr_reason, make_variable

from .distributed import Dist, all_reduce_mean
from .errors import TrainingDiverged
from .micro import accumulate_step

CHECK_EVERY = 25  # steps between checks that the loss is finite (each check waits for the device)


def lr_at(train: Training, epoch: int, step: int = 0, steps: int = 1) -> float:
    """Learning rate at ``step`` of ``steps`` in ``epoch``: a warm-up over ``warmup_epochs`` (per epoch as in
    LDAM, or per step as Goyal et al.'s gradual warm-up), then step decay (x gamma per milestone) or cosine."""
    if epoch < train.warmup_epochs:
        if train.warmup == "step":
            return train.lr * (epoch * steps + step + 1) / (train.warmup_epochs * steps)
        return train.lr * (epoch + 1) / train.warmup_epochs
    if train.schedule == "cosine":
        return 0.5 * train.lr * (1.0 + math.cos(math.pi * epoch / train.epochs))
    passed = sum(epoch >= m for m in train.milestones)
    return train.lr * train.gamma ** passed


def make_optimizer(model: torch.nn.Module, train: Training) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, as every recipe in the paper."""
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                           weight_decay=train.weight_decay)


def train_one_epoch(model, loss_fn: Callable, batches, optimizer, lr: float | Callable[[int], float],
                    device: torch.device, bf16: bool, channels_last: bool, dist: Dist,
                    log: Callable[[str], None] | None = None, steps: int = 0, micro_batch: int = 0) -> dict[str, float]:
    """Train over an iterable of batches; returns mean loss parts and images/s. ``lr`` is a fixed rate or a
    function of the step. ``micro_batch`` (0: none) splits each batch into passes whose gradients accumulate.

    ``loss_fn(outputs, batch)`` returns a dict of named loss tensors with the total under ``loss``. A loss that
    is not finite raises TrainingDiverged (checked every CHECK_EVERY steps and at the end).
    """
    model.train()
    try:
        return _train_epoch(model, loss_fn, batches, optimizer, lr, device, bf16, channels_last, dist, log, steps,
                            micro_batch)
    finally:
        # a loader that works ahead stops now, on an error too, rather than when its traceback is freed
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _train_epoch(model, loss_fn, batches, optimizer, lr, device, bf16, channels_last, dist, log, steps,
                 micro_batch) -> dict[str, float]:
    sums: dict[str, torch.Tensor] = {}
    seen, start, count = 0, time.perf_counter(), 0
    for count, batch in enumerate(batches, 1):
        rate_now = lr(count - 1) if callable(lr) else lr
        for group in optimizer.param_groups:
            group["lr"] = rate_now
        parts = accumulate_step(model, loss_fn, batch, optimizer, device, bf16, channels_last, micro_batch)
        n = len(batch.labels)
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value * n
        seen += n
        if count % CHECK_EVERY == 0:
            _check_finite(sums["loss"], count, rate_now)
        if log and steps and count % 50 == 0:
            rate = seen / (time.perf_counter() - start)
            log(f"  step {count}/{steps}  loss {parts['loss'].item():.4f}  {rate * dist.world:.0f} img/s  "
                f"epoch ETA {_hms((steps - count) * n / max(rate, 1e-9))}")
    elapsed = time.perf_counter() - start
    if sums:
        _check_finite(sums["loss"], count, rate_now)
    names = sorted(sums)
    means = all_reduce_mean(torch.stack([sums[n] / max(seen, 1) for n in names]), dist) if names else []
    stats = {n: float(v) for n, v in zip(names, means)}
    stats["images_per_s"] = seen * dist.world / max(elapsed, 1e-9)
    stats["seconds"] = elapsed
    return stats


@torch.no_grad()
def evaluate(model, batches, device: torch.device, bf16: bool, channels_last: bool,
             keep_features: bool = True) -> dict[str, np.ndarray]:
    """Per-sample test outputs over an iterable of batches: ``logits`` in float16 (what eval.npz keeps; half
    the memory at iNaturalist's 24,426 x 8,142), ``preds`` (the argmax of the float32 logits, which the
    accuracies use), ``features`` (float16), ``labels`` and ``index``; and ``max_abs`` and ``finite`` of the
    float32 logits, which tell a diverged model."""
    model.eval()
    logits, preds, feats, labels, index = [], [], [], [], []
    max_abs, finite = 0.0, True
    for batch in batches:
        with autocast(device, bf16):
            out = model(to_device(batch.images, device, channels_last))
        z = out["logits"].float()
        preds.append(z.argmax(1).cpu().numpy())
        finite = finite and bool(torch.isfinite(z).all())
        max_abs = max(max_abs, float(z.abs().max())) if z.numel() else max_abs
        logits.append(z.to(torch.float16).cpu().numpy())
        if keep_features and "features" in out:
            feats.append(out["features"].to(torch.float16).cpu().numpy())
        labels.append(batch.labels.numpy())
        index.append(batch.index)
    result = {"logits": np.concatenate(logits), "preds": np.concatenate(preds), "labels": np.concatenate(labels),
              "index": np.concatenate(index), "max_abs": np.float32(max_abs), "finite": np.bool_(finite)}
    if feats:
        result["features"] = np.concatenate(feats)
    return result


# --- checkpoints ------------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Save a plain dict atomically (temporary file, then rename), so a kill never leaves half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint without running any code from it (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_finite(loss_sum: torch.Tensor, step: int, lr: float) -> None:
    if not torch.isfinite(loss_sum):
        raise TrainingDiverged(f"the loss is not finite by step {step} (lr {lr:.4g})")


def diverged_message(stage: str, train: Training, base: Training, detail: str) -> str:
    """Why a run diverged and what to do, naming the stage's own Make variables; ``base``: its defaults."""
    warm = f"a {train.warmup_epochs}-epoch {train.warmup} warm-up" if train.warmup_epochs else "no warm-up"
    return (f"the {stage} diverged: {detail}. It trained at {lr_reason(train, base)}, batch {train.batch_size}, "
            f"with {warm}. The learning rate is likely too high for this batch, or it lacks a warm-up: lower it "
            f"({make_variable(stage, 'lr')}), give the batch without an lr so the lr scales with it, or add a "
            f"gradual warm-up ({MAKE_VARIABLES[stage]['*']}=\"warmup_epochs=5 warmup=step\"). "
            f"Its folder holds no result; other settings train in a folder of their own.")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def fit(model, loss_fn: Callable, loader, train: Training, optimizer, dist: Dist, checkpoint: Path,
        evaluate_fn: Callable[[int], dict] | None = None, log: Callable[[str], None] = print,
        micro_batch: int = 0) -> list[dict]:
    """Run the epochs that remain, saving a checkpoint after each; resume from ``checkpoint`` if present.
    ``micro_batch`` (0: none) is the images per pass on this rank; gradients accumulate over its batch.

    Data order and augmentation are pure functions of (seed, epoch), and the checkpoint carries the model,
    optimizer and RNG state, so a resumed run ends with the same weights as an uninterrupted one.
    """
    history: list[dict] = []
    first = 0
    if checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history, first = list(state["history"]), int(state["epoch"])
        if first < train.epochs:
            log(f"resuming from {checkpoint} after epoch {first}")
    run_start = time.perf_counter()
    steps = len(loader)
    for epoch in range(first, train.epochs):
        rate = lambda step, e=epoch: lr_at(train, e, step, steps)  # noqa: E731 (per-epoch warm-up ignores step)
        try:
            stats = train_one_epoch(model, loss_fn, loader.batches(epoch), optimizer, rate, dist.device, train.bf16,
                                    train.channels_last, dist, log if dist.main else None, steps, micro_batch)
        except TrainingDiverged as error:
            raise TrainingDiverged(f"{error} of epoch {epoch + 1}") from None
        lr = lr_at(train, epoch, steps - 1, steps)  # the epoch's last (for "epoch" warm-up: its only) rate
        stats.update(epoch=epoch + 1, lr=lr)
        if evaluate_fn and train.eval_every and (epoch + 1) % train.eval_every == 0 and epoch + 1 < train.epochs:
            stats.update(evaluate_fn(epoch + 1))
        history.append(stats)
        if dist.main:
            save_checkpoint(checkpoint, {"epoch": epoch + 1, "model": unwrap(model).state_dict(),
                                         "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                                         "history": history, "config": train.to_dict()})
            done = epoch + 1 - first
            eta = (time.perf_counter() - run_start) / done * (train.epochs - epoch - 1)
            parts = "  ".join(f"{k} {stats[k]:.4f}" for k in sorted(stats) if k not in
                              ("epoch", "lr", "images_per_s", "seconds", "loss") and isinstance(stats[k], float))
            log(f"epoch {epoch + 1}/{train.epochs}  loss {stats['loss']:.4f}  {parts}  lr {lr:.5f}  "
                f"{stats['images_per_s']:.0f} img/s  ETA {_hms(eta)}")
            sys.stdout.flush()
    return history
