"""The two-class flatness experiment (DiVE, Appendix A): does a flatter virtual distribution help the tail?

A head class and a tail class of Fashion-MNIST are sampled at sizes (n_head, n_tail). Virtual examples come from
label smoothing of the head images only: each head image's target is (1 - eps) head + eps tail, each tail image
keeps its one-hot target. The virtual tail-to-head ratio is then

    R = (n_tail + eps * n_head) / ((1 - eps) * n_head),

and the experiment measures head and tail accuracy on the balanced test images of the two classes as R grows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.sources.base import Split


def virtual_ratio(n_head: int, n_tail: int, eps: float) -> float:
    """R = (n_tail + n_head * eps) / (n_head - n_head * eps): virtual tail mass over virtual head mass."""
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    return (n_tail + n_head * eps) / (n_head - n_head * eps)


def smoothed_targets(is_head: np.ndarray, eps: float) -> np.ndarray:
    """Soft targets [N, 2] (column 0 head, 1 tail): head rows (1 - eps, eps), tail rows one-hot (0, 1)."""
    is_head = np.asarray(is_head, dtype=bool)
    targets = np.zeros((len(is_head), 2), dtype=np.float32)
    targets[is_head] = (1 - eps, eps)
    targets[~is_head, 1] = 1
    return targets


def pick(labels: np.ndarray, cls: int, n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    """``n`` indices of class ``cls``, drawn without replacement (sorted, so file order is kept)."""
    where = np.flatnonzero(labels == cls)
    if n > len(where):
        raise ValueError(f"{what} class {cls} has {len(where)} training images; {n} were asked for")
    return np.sort(rng.choice(where, size=n, replace=False))


class PixelMLP(nn.Module):
    """A one-hidden-layer MLP on the raw pixels (1024 -> 128 -> 2; 0.13 MFLOP an image): a run takes about a
    second on one CPU core, so the 75 runs of the experiment take minutes. A small conv net (two 3x3 conv blocks
    with BatchNorm) took 30 s a run here and, within the same step budget, collapsed to the head class at
    eps 0.4 (tail accuracy 0 on 5000/50), which measures its optimisation rather than the labels."""

    def __init__(self, in_pixels: int = 32 * 32, hidden: int = 128, num_classes: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_pixels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class Schedule:
    """Training for the flatness runs: a fixed number of SGD steps whatever the training set's size, so the
    size pairs differ only in their data."""

    steps: int = 400
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4


def to_tensor(images: np.ndarray, mean: float = 0.2860, std: float = 0.3530) -> torch.Tensor:
    """uint8 [N, H, W, 1] -> normalized float [N, 1, H, W]."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std


def train_and_test(x: torch.Tensor, targets: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray,
                   seed: int, schedule: Schedule) -> dict[str, float]:
    """Train a PixelMLP on soft ``targets`` and return head / tail / mean accuracy (percent) on the test set
    (``y_test``: 0 head, 1 tail)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PixelMLP(x[0].numel())
    opt = torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                          weight_decay=schedule.weight_decay)
    soft = torch.from_numpy(targets)
    n = len(x)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for step in range(schedule.steps):
        if len(order) < schedule.batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:schedule.batch_size], order[schedule.batch_size:]
        for group in opt.param_groups:  # cosine decay to zero
            group["lr"] = schedule.lr * 0.5 * (1 + math.cos(math.pi * step / schedule.steps))
        loss = -(soft[idx] * F.log_softmax(model(x[idx]), dim=1)).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x_test.split(1000)]).numpy()
    head, tail = y_test == 0, y_test == 1
    acc_head = 100.0 * float((pred[head] == 0).mean())
    acc_tail = 100.0 * float((pred[tail] == 1).mean())
    return {"head": acc_head, "tail": acc_tail, "mean": (acc_head + acc_tail) / 2}


def run_point(train: Split, test: Split, head: int, tail: int, n_head: int, n_tail: int, eps: float,
              run: int, schedule: Schedule) -> dict[str, float]:
    """One run of one (sizes, eps) point. Run ``r`` draws the same images, initial weights and batch order for
    every eps, so the eps values of one run differ only in their labels."""
    rng = np.random.default_rng([n_head, n_tail, run])
    heads = pick(train.labels, head, n_head, rng, "head")
    tails = pick(train.labels, tail, n_tail, rng, "tail")
    index = np.concatenate([heads, tails])
    targets = smoothed_targets(np.arange(len(index)) < n_head, eps)
    keep = np.flatnonzero((test.labels == head) | (test.labels == tail))
    y_test = (test.labels[keep] == tail).astype(np.int64)
    return train_and_test(to_tensor(train.images[index]), targets, to_tensor(test.images[keep]), y_test,
                          seed=run, schedule=schedule)
