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
from store import codecs, topk

FLOAT16_RELATIVE = 2.0 ** -11  # float16 rounds a normal number to within this fraction of itself
FLOAT16_ABSOLUTE = 2.0 ** -25  # and a subnormal one to within this


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
    steps = _steps(store)
    for k, (start, stop, view) in enumerate(steps):
        parts = store.read_stored(start, stop, view)
        for j, (tau, power) in enumerate(settings):
            sums[j] += soft_targets_np(store.decode(parts, power / tau), tau, power).sum(axis=0)
        if progress:
            progress(k + 1, len(steps))
    return sums / store.v


def _steps(store) -> list[tuple[int, int, int]]:
    """(start, stop, view) of every inner chunk of the store, in storage order."""
    return [(start, min(start + store.chunk, store.n), view)
            for start in range(0, store.n, store.chunk) for view in range(store.v)]


def count_error_bounds(store, settings: list[tuple[float, float]], progress=None) -> np.ndarray:
    """A bound on |V_c - V_c(exact logits)| per class that the store's codec implies, for every (tau, p) in
    ``settings``: float64 [len(settings), C].

    Dense codecs: a decoded logit is within e of the teacher's (int8: step / 2 of its row; float16: its
    rounding), so each target is within a factor exp(+-2 * beta * e) of the exact one. topk: a tail class's
    target lies in [0, t_K] decoded and exact alike, so each view adds t_K to the bound of every class outside
    its top K; the top K are counted exact (the interpolated tail mass also rescales them slightly, by at most
    the 0.004 of tail share measured in ``store.topk``; not included).
    sampled: a tail class's estimate is unbiased but random, so the bound is statistical, two standard errors
    of the sum over views (independent draws: its variance is at most sum_v E[t^_v^2], estimated by the
    observed sum of squares), about 95%, not a hard bound (the O(1/K) bias of self-normalised weights and the
    tail mass's interpolation are not included).
    """
    linear = np.zeros((len(settings), store.c), dtype=np.float64)
    squares = np.zeros_like(linear)
    steps = _steps(store)
    for k, (start, stop, view) in enumerate(steps):
        parts = store.read_stored(start, stop, view)
        for j, (tau, power) in enumerate(settings):
            if store.codec == "sampled":
                squares[j] += _sampled_squares(store, parts, tau, power)
            else:
                linear[j] += _chunk_bound(store, parts, power / tau, tau, power)
        if progress:
            progress(k + 1, len(steps))
    return (linear + 2 * np.sqrt(squares)) / store.v


def _sampled_squares(store, parts: dict, tau: float, power: float) -> np.ndarray:
    """Per class, the sum over the chunk's views of the squared decoded target, tail classes only."""
    t = soft_targets_np(store.decode(parts, power / tau), tau, power)
    np.put_along_axis(t, topk.split(parts["logits"], store.k)[1], 0.0, axis=1)  # the top K are exact
    return (t * t).sum(axis=0)


def _chunk_bound(store, parts: dict, beta: float, tau: float, power: float) -> np.ndarray:
    if store.codec == "topk":
        t_k = topk.top_target(parts["logits"], store.k, store.c, beta)
        bound = np.repeat(t_k[:, None], store.c, axis=1)
        np.put_along_axis(bound, topk.split(parts["logits"], store.k)[1], 0.0, axis=1)
        return bound.sum(axis=0)
    z = store.decode(parts)
    if store.codec == "int8":
        err = codecs.int8_error_bound(parts).astype(np.float64)
    else:
        err = FLOAT16_RELATIVE * np.abs(z).max(axis=-1) + FLOAT16_ABSOLUTE
    return (soft_targets_np(z, tau, power) * np.expm1(2 * beta * err)[:, None]).sum(axis=0)


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
