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

from pipeline.settings import Training
from pipeline.device import autocast, to_device

from .distributed import Dist, all_reduce_mean


def lr_at(train: Training, epoch: int) -> float:
    """Learning rate of an epoch: linear warm-up, then step decay (x gamma per milestone passed) or cosine."""
    if epoch < train.warmup_epochs:
        return train.lr * (epoch + 1) / train.warmup_epochs
    if train.schedule == "cosine":
        return 0.5 * train.lr * (1.0 + math.cos(math.pi * epoch / train.epochs))
    passed = sum(epoch >= m for m in train.milestones)
    return train.lr * train.gamma ** passed


def make_optimizer(model: torch.nn.Module, train: Training) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, as every recipe in the paper."""
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                           weight_decay=train.weight_decay)


def train_one_epoch(model, loss_fn: Callable, batches, optimizer, lr: float, device: torch.device,
                    bf16: bool, channels_last: bool, dist: Dist, log: Callable[[str], None] | None = None,
                    steps: int = 0) -> dict[str, float]:
    """Train over an iterable of batches at a fixed lr; returns mean loss parts and images/s.

    ``loss_fn(outputs, batch)`` returns a dict of named loss tensors with the total under ``loss``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    sums: dict[str, torch.Tensor] = {}
    seen, start, count = 0, time.perf_counter(), 0
    for count, batch in enumerate(batches, 1):
        images = to_device(batch.images, device, channels_last)
        with autocast(device, bf16):
            outputs = model(images)
        parts = loss_fn(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() * len(images)
        seen += len(images)
        if log and steps and count % 50 == 0:
            rate = seen / (time.perf_counter() - start)
            log(f"  step {count}/{steps}  loss {parts['loss'].item():.4f}  {rate * dist.world:.0f} img/s  "
                f"epoch ETA {_hms((steps - count) * len(images) / max(rate, 1e-9))}")
    elapsed = time.perf_counter() - start
    names = sorted(sums)
    means = all_reduce_mean(torch.stack([sums[n] / max(seen, 1) for n in names]), dist) if names else []
    stats = {n: float(v) for n, v in zip(names, means)}
    stats["images_per_s"] = seen * dist.world / max(elapsed, 1e-9)
    stats["seconds"] = elapsed
    return stats


@torch.no_grad()
def evaluate(model, batches, device: torch.device, bf16: bool, channels_last: bool,
             keep_features: bool = True) -> dict[str, np.ndarray]:
    """Per-sample logits (float32), features (float16) and labels over an iterable of batches."""
    model.eval()
    logits, feats, labels, index = [], [], [], []
    for batch in batches:
        with autocast(device, bf16):
            out = model(to_device(batch.images, device, channels_last))
        logits.append(out["logits"].float().cpu().numpy())
        if keep_features and "features" in out:
            feats.append(out["features"].to(torch.float16).cpu().numpy())
        labels.append(batch.labels.numpy())
        index.append(batch.index)
    result = {"logits": np.concatenate(logits), "labels": np.concatenate(labels), "index": np.concatenate(index)}
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def fit(model, loss_fn: Callable, loader, train: Training, optimizer, dist: Dist, checkpoint: Path,
        evaluate_fn: Callable[[int], dict] | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run the epochs that remain, saving a checkpoint after each; resume from ``checkpoint`` if present.

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
    for epoch in range(first, train.epochs):
        lr = lr_at(train, epoch)
        stats = train_one_epoch(model, loss_fn, loader.batches(epoch), optimizer, lr, dist.device,
                                train.bf16, train.channels_last, dist, log if dist.main else None, len(loader))
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
