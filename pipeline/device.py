"""Where tensors run and at what precision: shared by the data path (the online teacher), the models' router
and the training loop, so none of them imports another for it."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CPU or GPU when enabled."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
