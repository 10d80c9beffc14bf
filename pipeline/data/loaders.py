"""Batches of views: the epoch order and view parameters (pure functions of seed and epoch), executed by the
torch reference for in-memory datasets or by DALI for image files."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline.settings import PREFETCH
from store.order import random_order
from store.prefetch import prefetched

from .sources.base import Split
from .views import ViewSpec, apply_views_batch, eval_params, normalize, view_params


def one_cpu_thread() -> None:
    """Run this (prefetching) thread's CPU tensor operations on one core. torch's OpenMP threads are per
    calling thread, so this leaves the step's threads alone; a second team of its size would compete with
    the step for the cores (and spin between batches) for work that is a small part of it."""
    torch.set_num_threads(1)


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, C, S, S], normalized
    labels: torch.Tensor  # int64 [B]
    index: np.ndarray  # int64 [B], positions in the split
    params: np.ndarray  # float32 [B, P], the views applied
    teacher_logits: torch.Tensor | None = None  # float32 [B, C], raw, for distillation


class TorchExecutor:
    """Applies views to in-memory uint8 HWC images as batched tensor operations (``apply_views_batch``), on
    ``device``: on a GPU the dataset is held there (CIFAR's 50,000 images are 150 MiB) and each batch is
    gathered, flipped and coloured there, so no Python loop over images and no host copy feeds the step."""

    def __init__(self, images: np.ndarray, size: int, mean, std, device: torch.device = torch.device("cpu")) -> None:
        self.device = torch.device(device)
        self.images = torch.from_numpy(images)
        if self.device.type == "cuda":
            self.images = self.images.to(self.device)
        self.size, self.mean, self.std = size, mean, std

    def sizes(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source heights and widths of samples ``index``."""
        h, w = self.images.shape[1:3]
        return np.full(len(index), h, dtype=np.int64), np.full(len(index), w, dtype=np.int64)

    def run(self, index: np.ndarray, params: np.ndarray) -> torch.Tensor:
        picked = self.images[torch.from_numpy(np.asarray(index, dtype=np.int64)).to(self.device)]
        return normalize(apply_views_batch(picked, params, self.size), self.mean, self.std)


class FileExecutor:
    """Decodes image files with DALI (GPU where there is one) and applies views there."""

    def __init__(self, files: tuple[str, ...], size: int, mean, std, batch_size: int, workers: int,
                 device: torch.device) -> None:
        from .dali import DaliExecutor  # DALI only loads for image-file datasets

        self.files = files
        self._sizes = np.full((len(files), 2), -1, dtype=np.int64)  # read from headers on first use
        dali_device = "gpu" if device.type == "cuda" else "cpu"
        self.dali = DaliExecutor(size, mean, std, batch_size=batch_size, device=dali_device,
                                 num_threads=workers, device_id=device.index if device.type == "cuda" else None)

    def sizes(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source heights and widths of samples ``index``, from the image headers (read once, when first
        needed, so a bad file is met in its own batch, after the batches before it were done)."""
        from .dali import image_size

        for i in index[self._sizes[index, 0] < 0]:
            self._sizes[i] = image_size(self.files[i])
        return self._sizes[index, 0], self._sizes[index, 1]

    def run(self, index: np.ndarray, params: np.ndarray) -> torch.Tensor:
        return self.dali.run([self.files[i] for i in index], params)


def make_executor(split: Split, spec: ViewSpec, mean, std, batch_size: int, workers: int = 2,
                  device: torch.device = torch.device("cpu")):
    """The executor for a split: torch reference in memory, DALI for files."""
    if split.in_memory:
        return TorchExecutor(split.images, spec.size, mean, std, device)
    return FileExecutor(split.files, spec.size, mean, std, batch_size, workers, device)


class ViewLoader:
    """Yields batches of one epoch: shuffled, sharded by rank, each sample seen through a drawn view.

    Training: order = ``store.order.random_order``; each sample's view parameters come from
    ``view_params(spec, seed, index, view)``, where ``view`` is the epoch (teacher) or any per-sample view
    index the caller gives (student replaying cached views). Evaluation: file order, the evaluation view.
    Both are pure functions of (seed, epoch), so a background thread makes the next ``prefetch`` batches
    while the caller uses this one (0: each batch is made when asked for).
    """

    def __init__(self, split: Split, spec: ViewSpec, executor, batch_size: int, seed: int,
                 train: bool, rank: int = 0, world: int = 1, prefetch: int = PREFETCH) -> None:
        if train and batch_size % world:
            raise ValueError(f"batch size {batch_size} does not divide among {world} processes")
        self.split, self.spec, self.executor, self.prefetch = split, spec, executor, prefetch
        self.batch_size = batch_size // world if train else batch_size
        self.seed, self.train, self.rank, self.world = seed, train, rank, world
        self.labels = torch.from_numpy(split.labels)

    def local_order(self, epoch: int) -> np.ndarray:
        if not self.train:
            return np.arange(len(self.split))
        return random_order(epoch, len(self.split), self.seed, self.rank, self.world)

    def __len__(self) -> int:
        n = len(self.split) if not self.train else math.ceil(len(self.split) / self.world)
        return math.ceil(n / self.batch_size)

    def params(self, index: np.ndarray, view: np.ndarray | int) -> np.ndarray:
        heights, widths = self.executor.sizes(index)
        if self.train:
            return view_params(self.spec, self.seed, index, view, heights, widths)
        return eval_params(self.spec, heights, widths, self.split.in_memory)

    def batches(self, epoch: int = 0, views: np.ndarray | None = None) -> Iterator[Batch]:
        """One epoch of batches. ``views`` [N] picks each sample's view index (default: the epoch)."""
        return prefetched(lambda: self._batches(epoch, views), self.prefetch, "views", on_start=one_cpu_thread)

    def _batches(self, epoch: int, views: np.ndarray | None) -> Iterator[Batch]:
        order = self.local_order(epoch)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            view = epoch if views is None else views[index]
            params = self.params(index, view)
            yield Batch(self.executor.run(index, params), self.labels[index], index, params)


def test_loader(source, spec: ViewSpec, workers: int, device: torch.device, batch_size: int = 500,
                prefetch: int = PREFETCH) -> ViewLoader:
    """The test split in file order, each image through the evaluation view."""
    executor = make_executor(source.test, spec, source.mean, source.std, batch_size, workers, device)
    return ViewLoader(source.test, spec, executor, batch_size, seed=0, train=False, prefetch=prefetch)
