"""Student-side data: replay the cached views and pair each image with its teacher logits.

``CachedTargets`` streams (views, logits) from the logit store, never loading the teacher. ``OnlineTargets``
is the reference that proves the cache changes nothing: the same epoch plan and the same views, recomputed
from (view seed, sample, view), with the teacher run live on each batch.

The store's rows are the training samples in a seeded shuffled order (see ``row_order``), so that the
chunk-local reading order still mixes classes when a dataset's files are sorted by class. A row's sample is
found through its dataset id (``positions_of``).
"""
from __future__ import annotations

import math
import time
from typing import Iterator

import numpy as np
import torch

from pipeline.device import autocast, to_device
from store.order import chunked_order, view_for_epoch
from store.prefetch import prefetched
from store.reader import LogitStore

from .loaders import PREFETCH, Batch, one_cpu_thread
from .views import ViewSpec, view_params


def row_order(n: int, view_seed: int) -> np.ndarray:
    """Which training sample (position in the split) each store row holds: a seeded permutation."""
    return np.random.default_rng([view_seed, 0x524F5753]).permutation(n).astype(np.int64)


def positions_of(row_ids: np.ndarray, split_ids: np.ndarray) -> np.ndarray:
    """Positions in the split of the samples with dataset ids ``row_ids``; every id must be in the split."""
    order = np.argsort(split_ids, kind="stable")
    found = np.searchsorted(split_ids, row_ids, sorter=order)
    found = np.minimum(found, len(split_ids) - 1)
    positions = order[found]
    if not np.array_equal(split_ids[positions], row_ids):
        raise ValueError("the store holds samples that are not in this dataset split")
    return positions.astype(np.int64)


def timed(items: Iterator[Batch], owner) -> Iterator[Batch]:
    """``items``, adding the time the consumer waits for each to ``owner.wait_seconds``."""
    try:
        while True:
            start = time.perf_counter()
            item = next(items, None)
            owner.wait_seconds += time.perf_counter() - start
            if item is None:
                return
            yield item
    finally:
        items.close()  # leaving early stops the prefetching thread at once


class CachedTargets:
    """Batches of one epoch from the store: every sample once, through view ``view_for_epoch(epoch)``.

    The store streams logits a few batches ahead on its own threads; on top of that a prefetching thread
    replays the next ``prefetch`` batches' views while the caller trains on this one.
    """

    def __init__(self, store: LogitStore, split_ids: np.ndarray, executor, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, prefetch: int = PREFETCH) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not divide among {world} processes")
        self.store, self.executor, self.prefetch = store, executor, prefetch
        self.positions = positions_of(store.ids, split_ids)
        self.batch_size, self.seed, self.rank, self.world = batch_size // world, seed, rank, world
        self.labels = torch.from_numpy(store.labels)
        self.wait_seconds = 0.0  # time the caller waited for batches (store data and views), summed over epochs

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.store.n / self.world) / self.batch_size)

    def batches(self, epoch: int) -> Iterator[Batch]:
        return timed(prefetched(lambda: self._batches(epoch), self.prefetch, "cached", on_start=one_cpu_thread), self)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        for rows, _views, logits, params in self.store.stream(epoch, self.seed, self.batch_size, self.rank,
                                                              self.world):
            index = self.positions[rows]
            yield Batch(self.executor.run(index, params), self.labels[rows], index, params,
                        torch.from_numpy(logits))


class OnlineTargets:
    """The same epochs as ``CachedTargets`` over a store's plan, with the teacher run on each replayed view."""

    def __init__(self, teacher: torch.nn.Module, spec: ViewSpec, view_seed: int, v: int, chunk: int,
                 positions: np.ndarray, labels: np.ndarray, executor, batch_size: int, seed: int,
                 device: torch.device, bf16: bool, channels_last: bool, rank: int = 0, world: int = 1,
                 prefetch: int = PREFETCH) -> None:
        self.teacher, self.spec, self.view_seed = teacher.eval(), spec, view_seed
        self.n, self.v, self.chunk, self.executor = len(positions), v, chunk, executor
        self.positions = positions  # row -> sample position, as the store lays rows out
        self.labels = torch.from_numpy(labels)  # by sample position
        self.batch_size, self.seed, self.rank, self.world = batch_size // world, seed, rank, world
        self.device, self.bf16, self.channels_last = device, bf16, channels_last
        self.prefetch = prefetch

    @classmethod
    def like(cls, store: LogitStore, split, teacher: torch.nn.Module, spec: ViewSpec, executor,
             batch_size: int, seed: int, device: torch.device, bf16: bool, channels_last: bool, rank: int = 0,
             world: int = 1, prefetch: int = PREFETCH):
        """An online reference with the epoch plan of ``store`` (its rows, V and chunking; logits unread)."""
        return cls(teacher, spec, int(store.attrs["view_seed"]), store.v, store.chunk,
                   positions_of(store.ids, split.ids), split.labels, executor, batch_size, seed, device, bf16,
                   channels_last, rank, world, prefetch)

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / self.world) / self.batch_size)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.bf16):
            return self.teacher(to_device(images, self.device, self.channels_last))["logits"].float().cpu()

    def batches(self, epoch: int) -> Iterator[Batch]:
        """The views are made ahead by a prefetching thread; the teacher runs in the caller's thread, as the
        student does, because its forward pass is the compute that online distillation adds, not data."""
        views = prefetched(lambda: self._views(epoch), self.prefetch, "online", on_start=one_cpu_thread)
        try:
            for batch in views:
                batch.teacher_logits = self.teacher_logits(batch.images)
                yield batch
        finally:
            views.close()

    def _views(self, epoch: int) -> Iterator[Batch]:
        view = view_for_epoch(epoch, self.v, self.seed)
        order = chunked_order(epoch, self.n, self.chunk, self.seed, self.rank, self.world)
        for start in range(0, len(order), self.batch_size):
            index = self.positions[order[start:start + self.batch_size]]
            params = view_params(self.spec, self.view_seed, index, view, *self.executor.sizes(index))
            yield Batch(self.executor.run(index, params), self.labels[index], index, params)
