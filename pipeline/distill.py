"""Student-side data: replay the cached views and pair each image with its teacher logits.

``CachedTargets`` streams (views, logits) from the logit store, never loading the teacher. ``OnlineTargets``
is the reference that proves the cache changes nothing: the same epoch plan and the same views, recomputed
from (view seed, sample, view), with the teacher run live on each batch.
"""
from __future__ import annotations

import math
import time
from typing import Iterator

import numpy as np
import torch

from store.order import epoch_order, view_for_epoch
from store.reader import LogitStore

from .data import Batch
from .train import autocast, to_device
from .views import ViewSpec, view_params


class CachedTargets:
    """Batches of one epoch from the store: every sample once, through view ``view_for_epoch(epoch)``."""

    def __init__(self, store: LogitStore, executor, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not divide among {world} processes")
        self.store, self.executor = store, executor
        self.batch_size, self.seed, self.rank, self.world = batch_size // world, seed, rank, world
        self.labels = torch.from_numpy(store.labels)
        self.wait_seconds = 0.0  # time spent waiting for store data, summed over epochs

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.store.n / self.world) / self.batch_size)

    def batches(self, epoch: int) -> Iterator[Batch]:
        stream = iter(self.store.stream(epoch, self.seed, self.batch_size, self.rank, self.world))
        while True:
            start = time.perf_counter()
            item = next(stream, None)
            self.wait_seconds += time.perf_counter() - start
            if item is None:
                return
            index, _views, logits, params = item
            yield Batch(self.executor.run(index, params), self.labels[index], index, params,
                        torch.from_numpy(logits))


class OnlineTargets:
    """The same epochs as ``CachedTargets`` over a store's plan, with the teacher run on each replayed view."""

    def __init__(self, teacher: torch.nn.Module, spec: ViewSpec, view_seed: int, n: int, v: int, chunk: int,
                 labels: np.ndarray, executor, batch_size: int, seed: int, device: torch.device, bf16: bool,
                 channels_last: bool, rank: int = 0, world: int = 1) -> None:
        self.teacher, self.spec, self.view_seed = teacher.eval(), spec, view_seed
        self.n, self.v, self.chunk, self.executor = n, v, chunk, executor
        self.labels = torch.from_numpy(labels)
        self.batch_size, self.seed, self.rank, self.world = batch_size // world, seed, rank, world
        self.device, self.bf16, self.channels_last = device, bf16, channels_last

    @classmethod
    def like(cls, store: LogitStore, teacher: torch.nn.Module, spec: ViewSpec, executor, batch_size: int,
             seed: int, device: torch.device, bf16: bool, channels_last: bool, rank: int = 0, world: int = 1):
        """An online reference with the epoch plan of ``store`` (its n, V and chunking; logits unread)."""
        return cls(teacher, spec, int(store.attrs["view_seed"]), store.n, store.v, store.chunk, store.labels,
                   executor, batch_size, seed, device, bf16, channels_last, rank, world)

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / self.world) / self.batch_size)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.bf16):
            return self.teacher(to_device(images, self.device, self.channels_last))["logits"].float().cpu()

    def batches(self, epoch: int) -> Iterator[Batch]:
        view = view_for_epoch(epoch, self.v, self.seed)
        order = epoch_order(epoch, self.n, self.chunk, self.seed, self.rank, self.world)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            params = view_params(self.spec, self.view_seed, index, view, *self.executor.sizes(index))
            images = self.executor.run(index, params)
            yield Batch(images, self.labels[index], index, params, self.teacher_logits(images))
