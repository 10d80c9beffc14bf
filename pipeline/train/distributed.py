"""torch.distributed set-up from torchrun's environment: NCCL on GPUs, gloo on CPU, nothing when alone."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank, the world size, and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, device=dev)


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a tensor over ranks (identity when alone)."""
    if d.active:
        values = values.clone()
        dist.all_reduce(values)
        values /= d.world
    return values

