"""The ``topk`` logit codec: per view, the K largest raw logits, their classes, and a ten-number summary of the
other C - K logits ("the tail") from which the tail's probability mass is rebuilt at any temperature.

Why a summary and not nothing: DiVE chooses tau and power p at student time, and its targets are
t = softmax(beta * z) with sharpness beta = p / tau. At glyph-lt's teacher and K = 10, the tail holds 4% of
the mass at beta = 1 but 38% at beta = 1/3 and 94% at beta = 1/20, so caches that keep the top-K probabilities
at temperature 1 only (TinyViT, FKD) cannot serve another tau.

The summary is the tail's effective logit as a function of beta, the log-mean-exp

    m(beta) = (1 / beta) * log( (1 / (C - K)) * sum_{j in tail} exp(beta * z_j) ),

which rises monotonically from the tail's mean (beta -> 0) to its maximum (beta -> infinity). We store it at
the eight sharpnesses beta_i = 2^-6 .. 2^1 (tau from 0.5 to 64 at p = 1), plus those two limits, in float16.
Between grid points m is interpolated by a cubic Hermite spline in log beta (slopes by finite differences);
below 2^-6 linearly in beta from the mean, above 2 as m(2) + (1 - 2 / beta) * (max - m(2)).

The approximation, stated: decoding gives every tail class the same logit m(beta), so
(1) the top-K logits are exact (to float16, like the float16 codec);
(2) the tail's total mass is (C - K) * exp(beta * m(beta)), exact at the grid points to float16 and
    interpolated between them. On glyph-lt's teacher (C = 300, K = 10) the interpolation moved the tail's
    share of the mass by at most 0.004 (mean 0.001) over beta in [0.05, 1.5]; linear interpolation was 5 to 10
    times worse, a Gaussian fit of the tail useless beyond beta = 0.1, and quantile-bin means 10 times worse;
(3) each tail class gets the tail's mean share instead of its own: a tail class's target is wrong by at most
    t_K, the K-th largest target of that view (both the true and the decoded value lie in [0, t_K]).

Record: one uint16 array of width 2K + 10 per view (K float16 logits in descending order, K class indices,
10 float16 summary values), i.e. 4K + 20 bytes a view; classes up to 65,536.
"""
from __future__ import annotations

import numpy as np

TAIL_BETAS = 2.0 ** np.arange(-6, 2)  # sharpnesses p / tau at which the tail's log-mean-exp is stored
SUMMARY = len(TAIL_BETAS) + 2  # mean, the grid, max
MAX_CLASSES = 1 << 16  # class indices are stored as uint16


def check_k(k: int, c: int) -> int:
    """``k`` if the codec can store it for ``c`` classes, else ValueError naming the limits."""
    if c > MAX_CLASSES:
        raise ValueError(f"codec topk stores class indices as uint16: at most {MAX_CLASSES:,} classes, got {c:,}")
    if not 1 <= k < c:
        raise ValueError(f"topk={k} is out of range for {c} classes: K must be at least 1 and below C = {c} "
                         f"(at K >= C nothing is left to summarise; use codec=float16 to keep every logit)")
    return int(k)


def width(k: int) -> int:
    """uint16 values per view."""
    return 2 * k + SUMMARY


def row_bytes(k: int) -> int:
    return 2 * width(k)


def encode(z: np.ndarray, k: int) -> np.ndarray:
    """Records uint16 [..., 2K + 10] of float logits [..., C]."""
    z = np.asarray(z, dtype=np.float32)
    c = z.shape[-1]
    check_k(k, c)
    flat = z.reshape(-1, c)
    part = np.argpartition(-flat, k, axis=-1)  # [:k] the K largest, [k] the largest of the tail
    top_idx = part[:, :k]
    top = np.take_along_axis(flat, top_idx, axis=-1)
    order = np.argsort(-top, axis=-1, kind="stable")
    top_idx, top = np.take_along_axis(top_idx, order, -1), np.take_along_axis(top, order, -1)
    tail_max = np.take_along_axis(flat, part[:, k:k + 1], -1)[:, 0]
    summary = tail_summary(flat, top_idx, top, tail_max)
    record = np.empty((flat.shape[0], width(k)), dtype=np.uint16)
    record[:, :k] = top.astype(np.float16).view(np.uint16)
    record[:, k:2 * k] = top_idx.astype(np.uint16)
    record[:, 2 * k:] = summary.astype(np.float16).view(np.uint16)
    return record.reshape(*z.shape[:-1], width(k))


def tail_summary(flat: np.ndarray, top_idx: np.ndarray, top: np.ndarray, tail_max: np.ndarray) -> np.ndarray:
    """[rows, 10] float64: the tail's mean, its log-mean-exp at each of ``TAIL_BETAS``, its maximum, for float32
    logits ``flat`` [rows, C] whose top-K classes and values are ``top_idx`` and ``top``.

    Speed (the cache's writer runs this on every view): one float32 exp at the smallest beta, then each next
    beta's terms by squaring, since the grid doubles: exp(2 b x) = exp(b x)^2. Seven squarings raise float32's
    relative error of a term to ~2^7 * 6e-8 < 1e-5, far below the float16 that stores the result; at
    C = 8142 this is 5 times faster than one float64 exp per beta."""
    rows, c = flat.shape
    count = c - top.shape[-1]
    shifted = flat - tail_max[:, None]  # <= 0 on the tail, exactly 0 at its max: no overflow at any beta
    np.put_along_axis(shifted, top_idx, -np.inf, axis=-1)  # the top K leave every sum
    out = np.empty((rows, SUMMARY))
    out[:, 0] = (flat.sum(axis=-1, dtype=np.float64) - top.sum(axis=-1, dtype=np.float64)) / count
    terms = np.exp(shifted * np.float32(TAIL_BETAS[0]))
    for i, beta in enumerate(TAIL_BETAS):
        if i:
            np.multiply(terms, terms, out=terms)
        out[:, i + 1] = tail_max + (np.log(terms.sum(axis=-1, dtype=np.float64)) - np.log(count)) / beta
    out[:, -1] = tail_max
    return out


def tail_logit(summary: np.ndarray, sharpness: float) -> np.ndarray:
    """The tail's effective logit m(sharpness) of each row of ``summary`` [..., 10] (see the module doc)."""
    s = np.asarray(summary, dtype=np.float64)
    mean, grid, top = s[..., 0], s[..., 1:-1], s[..., -1]
    beta = float(sharpness)
    if beta <= 0:
        raise ValueError(f"sharpness p / tau must be positive, got {sharpness}")
    if beta <= TAIL_BETAS[0]:
        return mean + beta / TAIL_BETAS[0] * (grid[..., 0] - mean)
    if beta >= TAIL_BETAS[-1]:
        return grid[..., -1] + (1 - TAIL_BETAS[-1] / beta) * (top - grid[..., -1])
    x, nodes = np.log(beta), np.log(TAIL_BETAS)
    j = min(int(np.searchsorted(nodes, x, side="right")) - 1, len(nodes) - 2)
    h = nodes[j + 1] - nodes[j]
    t = (x - nodes[j]) / h
    slope = [h * (grid[..., min(i + 1, len(nodes) - 1)] - grid[..., max(i - 1, 0)])
             / (nodes[min(i + 1, len(nodes) - 1)] - nodes[max(i - 1, 0)]) for i in (j, j + 1)]
    return ((2 * t ** 3 - 3 * t ** 2 + 1) * grid[..., j] + (t ** 3 - 2 * t ** 2 + t) * slope[0]
            + (-2 * t ** 3 + 3 * t ** 2) * grid[..., j + 1] + (t ** 3 - t ** 2) * slope[1])


def split(record: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top logits float32 [..., K], class indices int64 [..., K], summary float32 [..., 10]) of records."""
    record = np.ascontiguousarray(record)
    return (record[..., :k].view(np.float16).astype(np.float32), record[..., k:2 * k].astype(np.int64),
            record[..., 2 * k:].view(np.float16).astype(np.float32))


def decode(record: np.ndarray, k: int, c: int, sharpness: float) -> np.ndarray:
    """Dense float32 logits [..., C] whose softmax at ``sharpness`` (p / tau) has the exact top-K logits and
    the rebuilt tail mass, spread evenly over the tail classes."""
    top, index, summary = split(record, k)
    dense = np.repeat(tail_logit(summary, sharpness).astype(np.float32)[..., None], c, axis=-1)
    np.put_along_axis(dense, index, top, axis=-1)
    return dense


def top_target(record: np.ndarray, k: int, c: int, sharpness: float) -> np.ndarray:
    """t_K, the K-th largest decoded target softmax(sharpness * z) of each view: a tail class's decoded target
    is wrong by at most this (its true and its decoded value both lie in [0, t_K])."""
    top, _, summary = split(record, k)
    beta = float(sharpness)
    a = beta * top.astype(np.float64)
    tail = np.log(c - k) + beta * tail_logit(summary, beta)
    peak = a[..., 0]
    norm = np.exp(a - peak[..., None]).sum(axis=-1) + np.exp(tail - peak)
    return np.exp(a[..., -1] - peak) / norm
