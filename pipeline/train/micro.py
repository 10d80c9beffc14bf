"""One optimizer step over a batch, in micro batches whose gradients accumulate.

The loss of a batch is a mean over its images, so the mean of per-micro-batch losses weighted by their share
of the batch has exactly the batch's gradient: an accumulated step equals the full-batch step for any model
whose forward pass treats images independently. BatchNorm does not: in training mode each micro batch is
normalized with its own mean and variance (noisier statistics, as on a device with that batch), and the
running statistics are updated once per micro batch rather than once per step, so they follow the data with
momentum applied micro-batches-per-step times as often. That is the same trade as data parallelism without
synchronized BatchNorm, which is how the paper's global batches were spread over GPUs.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from pipeline.device import autocast, to_device


def micro_slices(n: int, micro_batch: int) -> list[slice]:
    """Slices of a batch of ``n`` in passes of ``micro_batch`` (0 or >= n: one pass)."""
    size = n if micro_batch <= 0 or micro_batch >= n else micro_batch
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


def batch_part(batch, part: slice):
    """The images, labels, views and teacher logits of one micro batch."""
    logits = batch.teacher_logits
    return dataclasses.replace(batch, images=batch.images[part], labels=batch.labels[part],
                               index=batch.index[part], params=batch.params[part],
                               teacher_logits=None if logits is None else logits[part])


def accumulate_step(model, loss_fn: Callable, batch, optimizer, device: torch.device, bf16: bool,
                    channels_last: bool, micro_batch: int = 0) -> dict[str, torch.Tensor]:
    """Zero the gradients, run the batch's forward and backward passes (in micro batches, each loss weighted
    by its share of the batch), step the optimizer once; returns the batch's mean loss parts (detached).
    Under DDP, gradients are all-reduced once, after the last micro batch."""
    optimizer.zero_grad(set_to_none=True)
    n = len(batch.labels)
    parts_sum: dict[str, torch.Tensor] = {}
    slices = micro_slices(n, micro_batch)
    for i, part in enumerate(slices):
        piece = batch if len(slices) == 1 else batch_part(batch, part)
        share = (part.stop - part.start) / n
        last = i == len(slices) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, bf16):
                outputs = model(to_device(piece.images, device, channels_last))
            parts = loss_fn(outputs, piece)
            # one pass: the loss itself, so the default path computes exactly what it did before micro batches
            (parts["loss"] if len(slices) == 1 else parts["loss"] * share).backward()
        for name, value in parts.items():
            parts_sum[name] = parts_sum.get(name, 0.0) + value.detach().float() * share
    optimizer.step()
    return parts_sum
