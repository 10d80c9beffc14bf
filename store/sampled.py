"""The ``sampled`` logit codec: codec ``topk``'s record (the K largest raw logits, their classes and the tail's
ten-number summary) plus K classes drawn from the tail by importance sampling, with their raw logits.

Why: ``topk`` gives every tail class the tail's mean share, so a class's virtual count (the sum of its targets
over all views, what DiVE's analysis and its tail classes live on) is biased: on glyph-lt's teacher at K = 20,
by up to 81% of the count. Sparse Logit Sampling (Anshumann et al., ACL 2025) points out that top-K targets are
biased and sampled ones are not in expectation. Here the draws keep the tail's shape, unbiased, while the
top K stay exact and the summary keeps the tail's total mass exact (to its interpolation) at every tau.

Drawing: S = K tail classes per view, with replacement, from the proposal q_j = exp(b0 z_j) / sum_tail exp(b0 z),
b0 = 1/8, by systematic sampling (one uniform u per view, draws at the quantiles (u + i) / S: each class is
drawn S q_j times in expectation, like independent draws, with less variance). b0 sits in the middle of the
sharpnesses p / tau that DiVE uses (1/18 .. 1); on glyph-lt's teacher b0 = 1/8 gave smaller count errors than
1/16 or 1/4 at K = 10. It is part of the codec's definition: another b0 would be another codec name.

Decoding at sharpness beta (p / tau): each drawn class j (n_j draws) gets the importance weight
w_j = n_j exp((beta - b0) z_j), and the tail's rebuilt mass (``store.topk``) is split in proportion to w:

    t^_j = M_tail(beta) * w_j / sum_drawn w,          t^ = 0 for tail classes never drawn.

The approximation, stated: (1) and (2) of ``store.topk`` hold (the top K exact, the tail's total mass
interpolated); (3') a tail class's target is right in expectation over the draws, up to the O(1/S) bias of
self-normalised weights, but one view's estimate is sparse: at most S tail classes get mass, so per-view
KL(t || t^) is large (the mass of the classes never drawn), while sums over views, which are what virtual
counts and the student's averaged gradient see, come out right (measured: ``make bench-codecs``).

Record: one uint16 array of width 4K + 10 per view: the ``topk`` record (2K + 10), then K float16 logits of the
draws and their K class indices. 8K + 20 bytes a view.
"""
from __future__ import annotations

import numpy as np

from store import topk

PROPOSAL = 1 / 8  # b0: the sharpness of the proposal the tail draws come from
NEVER = np.float32(-1e30)  # the decoded logit of a tail class never drawn: a target of exactly 0 at any sharpness


def width(k: int) -> int:
    """uint16 values per view."""
    return topk.width(k) + 2 * k


def row_bytes(k: int) -> int:
    return 2 * width(k)


def encode(z: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Records uint16 [..., 4K + 10] of float logits [..., C]; ``rng`` gives each view's one uniform."""
    z = np.asarray(z, dtype=np.float32)
    c = z.shape[-1]
    flat = z.reshape(-1, c)
    head = topk.encode(flat, k)
    draws = tail_draws(flat, topk.split(head, k)[1], k, rng.random(len(flat)))
    record = np.empty((len(flat), width(k)), dtype=np.uint16)
    record[:, :topk.width(k)] = head
    record[:, topk.width(k):topk.width(k) + k] = np.take_along_axis(flat, draws, -1).astype(np.float16).view(np.uint16)
    record[:, topk.width(k) + k:] = draws.astype(np.uint16)
    return record.reshape(*z.shape[:-1], width(k))


def tail_draws(flat: np.ndarray, top_idx: np.ndarray, s: int, u: np.ndarray) -> np.ndarray:
    """int64 [rows, s]: classes outside ``top_idx`` drawn at the quantiles (u + i) / s of the proposal."""
    rows, c = flat.shape
    weights = np.exp(PROPOSAL * (flat - flat.max(axis=-1, keepdims=True)), dtype=np.float64)
    np.put_along_axis(weights, top_idx, 0.0, axis=-1)
    cdf = np.cumsum(weights, axis=-1)
    cdf /= cdf[:, -1:]
    quantiles = (u[:, None] + np.arange(s)[None, :]) / s  # in [0, 1), ascending
    offset = np.arange(rows)[:, None]  # row r's cdf lies in (r, r + 1]: one sorted array serves every row
    found = np.searchsorted((cdf + offset).ravel(), (quantiles + offset).ravel(), side="right")
    return np.clip(found.reshape(rows, s) - offset * c, 0, c - 1)  # a top-K class has zero width: never hit


def split_draws(record: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(draws' logits float32 [..., K], their classes int64 [..., K]) of records."""
    record = np.ascontiguousarray(record)
    base = topk.width(k)
    return record[..., base:base + k].view(np.float16).astype(np.float32), record[..., base + k:].astype(np.int64)


def decode(record: np.ndarray, k: int, c: int, sharpness: float) -> np.ndarray:
    """Dense float32 logits [..., C] whose softmax at ``sharpness`` (p / tau) is the record's estimate of the
    targets: the exact top K, and the rebuilt tail mass split over the drawn classes by importance weight."""
    record = np.asarray(record)
    shape, flat = record.shape[:-1], record.reshape(-1, record.shape[-1])
    head = flat[:, :topk.width(k)]
    top, index, summary = topk.split(head, k)
    logits, draws = split_draws(flat, k)
    beta = float(sharpness)
    log_mass = np.log(c - k) + beta * topk.tail_logit(summary, beta)  # log sum_tail exp(beta z), rebuilt
    rows = np.arange(len(flat))[:, None]
    counts = np.zeros((len(flat), c))
    np.add.at(counts, (rows, draws), 1.0)
    log_w = np.full((len(flat), c), -np.inf)
    log_w[rows, draws] = (beta - PROPOSAL) * logits.astype(np.float64)
    with np.errstate(divide="ignore"):
        log_w += np.log(counts)
    peak = log_w.max(axis=-1, keepdims=True)
    log_w -= peak + np.log(np.exp(log_w - peak).sum(axis=-1, keepdims=True)) - log_mass[:, None]
    dense = np.where(np.isfinite(log_w), log_w / beta, NEVER).astype(np.float32)
    np.put_along_axis(dense, index, top, axis=-1)
    return dense.reshape(*shape, c)
