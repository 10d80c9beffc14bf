"""Virtual example distributions (DiVE, Sec. 3): what the teacher's soft labels add up to per class.

For a temperature tau and power p, each stored view's raw logits z give t = softmax(p * z / tau) (the power-
normalized softmax(z / tau)). The virtual count of class c is V_c = (1/V) sum_i sum_v t_c(i, v): the number
of examples' worth of soft label mass class c receives, averaged over views. DiVE helps tail classes when
V is flatter than the real counts n_c.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.data.sources.base import class_groups


def soft_targets_np(z: np.ndarray, tau: float, power: float) -> np.ndarray:
    """t = softmax(p * z / tau) along the last axis, in float64 (numpy twin of ``losses.soft_targets``)."""
    a = z.astype(np.float64) * (power / tau)
    a -= a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=-1, keepdims=True)


def virtual_counts(store, settings: list[tuple[float, float]], progress=None) -> np.ndarray:
    """V_c for every (tau, p) in ``settings``: float64 [len(settings), C], streaming the store chunk by chunk
    (one view of ``chunk`` samples at a time, so memory stays bounded whatever the store's size)."""
    sums = np.zeros((len(settings), store.c), dtype=np.float64)
    steps = [(start, min(start + store.chunk, store.n), view)
             for start in range(0, store.n, store.chunk) for view in range(store.v)]
    for k, (start, stop, view) in enumerate(steps):
        z, _ = store.read_rows(start, stop, view)
        for j, (tau, power) in enumerate(settings):
            sums[j] += soft_targets_np(z, tau, power).sum(axis=0)
        if progress:
            progress(k + 1, len(steps))
    return sums / store.v


def flatness(counts: np.ndarray, train_counts: np.ndarray) -> dict[str, float]:
    """min/max, the tail-to-head ratio R (mean of the Few group over the mean of the Many group) and the
    normalized entropy H(counts / sum) / log C of a per-class count vector; groups come from ``train_counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    groups = class_groups(train_counts)
    share = counts / counts.sum()
    nz = share[share > 0]
    out = {"min_over_max": float(counts.min() / counts.max()),
           "entropy": float(-(nz * np.log(nz)).sum() / math.log(len(counts)))}
    means = {g: float(counts[m].mean()) if m.any() else float("nan") for g, m in groups.items()}
    out["tail_to_head"] = means["few"] / means["many"] if groups["few"].any() and groups["many"].any() else float("nan")
    out.update({f"mean_{g}": v for g, v in means.items()})
    return out


def smallest_tau(store, power: float, target: float, taus: np.ndarray | None = None, progress=None) -> float | None:
    """The smallest tau on a log grid (0.25 .. 64, 97 points, ratio ~1.06) whose virtual min/max reaches
    ``target`` at power ``power``; None if none does. One streaming pass evaluates the whole grid."""
    taus = np.geomspace(0.25, 64, 97) if taus is None else np.asarray(taus)
    counts = virtual_counts(store, [(float(t), power) for t in taus], progress)
    ratios = counts.min(axis=1) / counts.max(axis=1)
    hits = np.flatnonzero(ratios >= target)
    return float(taus[hits[0]]) if len(hits) else None
