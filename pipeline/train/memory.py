"""How many images a device can take per pass: measured with probe steps before training, not guessed.

On a CPU an out-of-memory process is killed without a word, so the training step's memory is measured first:
a copy of the model runs a forward and backward pass on two small synthetic micro batches (the real model,
its BatchNorm statistics and the random number generators are untouched), and the growth between them gives
the bytes per image. On CUDA the allocator's peak is measured. On a CPU the process's peak resident size is
no measure (glibc keeps and reuses freed memory, so a second probe shows little growth), so what autograd
saves for the backward pass is counted instead, every storage once: the activations that grow with the
batch. A step needs those, the gradients and the momentum buffers (two more copies of the weights), and
``TRANSIENT`` more for the temporaries of the backward pass. The largest micro batch that divides the rank's batch and
fits in the free memory (``MEM_FRACTION`` of it) is chosen; if none fits, the run stops with a message that
says what the batch needs, what is free and what to do.

Free memory: on CUDA, the device's free memory; on a CPU, MemAvailable, lowered by a cgroup limit and by
``DIVE_MEMORY_BUDGET_GIB`` when set (for shared machines), shared among the node's ranks.
"""
from __future__ import annotations

import copy
import gc
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.device import autocast, to_device

from .errors import MemoryPlanError

MEM_FRACTION = 0.8  # of the free memory, for a chosen micro batch (the rest: the loader, fragmentation)
TRANSIENT = 1.5  # CPU: a backward pass's temporaries, as a share of the saved activations
GIB = 2 ** 30


def free_bytes(device: torch.device) -> int:
    """Memory this rank may still use."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = _meminfo("MemAvailable")
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        free = min(free, limit - used)
    budget = os.environ.get("DIVE_MEMORY_BUDGET_GIB")
    if budget:
        free = min(free, int(float(budget) * GIB))  # what the run may add to what it holds now
    return max(0, free // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise MemoryPlanError(f"/proc/meminfo has no {key}")


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _reset_peak(device: torch.device) -> int:
    """Reset the CUDA allocator's peak mark; returns the memory allocated now."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def probe_batch(make_batch: Callable, m: int):
    """A synthetic batch of ``m`` images from ``make_batch(m, generator)``, drawn from its own generator."""
    return make_batch(m, torch.Generator().manual_seed(m))


def step_bytes(model, loss_fn: Callable, batch, device: torch.device, bf16: bool, channels_last: bool,
               base: int) -> int:
    """Bytes one forward and backward pass of ``batch`` through ``model`` needs: on CUDA the allocator's peak
    above ``base`` (the memory allocated before the first probe), on a CPU the count of ``_saved_bytes``."""
    if device.type != "cuda":
        return _saved_bytes(model, loss_fn, batch, device, bf16, channels_last)
    _reset_peak(device)
    with autocast(device, bf16):
        outputs = model(to_device(batch.images, device, channels_last))
    loss_fn(outputs, batch)["loss"].backward()
    torch.cuda.synchronize(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    del outputs
    model.zero_grad(set_to_none=True)
    return max(0, peak - base)


def _saved_bytes(model, loss_fn: Callable, batch, device: torch.device, bf16: bool, channels_last: bool) -> int:
    """What one pass needs on a CPU: the storages autograd saves for backward (each counted once) times
    1 + TRANSIENT, plus the gradients and momentum buffers of the weights."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast(device, bf16):
            outputs = model(to_device(batch.images, device, channels_last))
        loss = loss_fn(outputs, batch)["loss"]
    loss.backward()
    del outputs, loss
    model.zero_grad(set_to_none=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(sum(storages.values()) * (1 + TRANSIENT) + 2 * weights)


def divisors_down(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan_micro_batch(model, loss_fn: Callable, make_batch: Callable, local_batch: int, asked: int,
                     device: torch.device, bf16: bool, channels_last: bool, what: str, hint: str,
                     log=print) -> int:
    """The images per pass for a rank's ``local_batch``: ``asked`` if given (and it fits), else (0, "auto")
    the largest divisor of the batch that fits. ``what`` names the step in messages ("batch 512 of resnext50
    at 224 px"); ``hint`` is how the user sets micro_batch for this stage."""
    probe = copy.deepcopy(model).to(device)
    probe.train()
    sizes = sorted({min(local_batch, 2), min(local_batch, 16)})
    rng_state = torch.get_rng_state()
    try:
        base = _reset_peak(device) if device.type == "cuda" else 0
        used = [step_bytes(probe, loss_fn, probe_batch(make_batch, m), device, bf16, channels_last, base)
                for m in sizes]
    finally:
        torch.set_rng_state(rng_state)
        del probe
        gc.collect()
    per_image = (used[-1] - used[0]) / (sizes[-1] - sizes[0]) if len(sizes) > 1 else used[0] / sizes[0]
    per_image = max(per_image, 1.0)
    fixed = max(0.0, used[0] - sizes[0] * per_image)
    free = free_bytes(device)

    def need(m: int) -> float:
        return fixed + m * per_image

    fits = [m for m in divisors_down(local_batch) if need(m) <= MEM_FRACTION * free]
    if asked:
        if need(asked) > MEM_FRACTION * free:
            raise MemoryPlanError(_message(what, local_batch, need, free, fits, hint, asked))
        chosen = asked
    elif not fits:
        raise MemoryPlanError(_message(what, local_batch, need, free, fits, hint, None))
    else:
        chosen = fits[0]
    passes = -(-local_batch // chosen)
    log(f"memory: {what} needs about {readable_bytes(need(local_batch))} for a step ({per_image / 2**20:.1f} MiB "
        f"per image, measured), {readable_bytes(free)} free: micro batch {chosen}"
        + (f", {passes} passes accumulate per step" if passes > 1 else " (the whole batch in one pass)"))
    return chosen


def readable_bytes(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def _message(what: str, local_batch: int, need, free: int, fits: list[int], hint: str, asked: int | None) -> str:
    head = (f"{what} needs about {readable_bytes(need(asked or local_batch))}"
            + (f" at micro_batch={asked}" if asked else "") + f", and {readable_bytes(free)} are free")
    if fits:
        return f"{head}; use micro_batch={fits[0]} or micro_batch=auto ({hint})"
    return (f"{head}; even one image per pass needs {readable_bytes(need(1))}. Use a smaller model or crop size, "
            f"or a machine with more memory")


def synthetic_batch_maker(batch_type, in_channels: int, size: int, num_classes: int, teacher_logits: bool):
    """``make_batch(m, generator)`` for probes: random images and labels of the run's shapes."""
    def make(m: int, generator: torch.Generator):
        images = torch.randn(m, in_channels, size, size, generator=generator)
        labels = torch.randint(0, num_classes, (m,), generator=generator)
        logits = torch.randn(m, num_classes, generator=generator) if teacher_logits else None
        return batch_type(images, labels, np.arange(m), np.zeros((m, 8), np.float32), logits)
    return make
