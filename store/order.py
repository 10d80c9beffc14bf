"""Traversal orders: which samples each rank visits in an epoch, and in what order, for the teacher and for
the students alike; and which recorded view a student reads each epoch. All are pure functions of their
arguments, so every rank, every rerun and a loader working ahead agree without communicating.

Two orders, for two kinds of access:

- ``random_order``: the teacher's epochs over a dataset it can read in any order (in memory, or image files):
  a seeded permutation, dealt to the ranks in turn.
- ``chunked_order``: a student's epochs over the logit store, which is read a chunk at a time.

The chunked order is chunk-aware and quasi-random, in the spirit of FFCV's quasi-random traversal: the chunks are
shuffled, consecutive groups of ``window`` shuffled chunks form a window, and the samples of a window are
shuffled together. A reader then needs only the chunks of about one window at a time, and reads each chunk
once per epoch, while batches still mix samples of ``window`` random chunks.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Separate streams for the view schedule and the sample order, so changing one never moves the other.
_VIEW_STREAM = 0x56494557
_ORDER_STREAM = 0x4F524452
_RANDOM_STREAM = 0x0DE5


def view_for_epoch(epoch: int, v: int, seed: int) -> int:
    """The view index that every sample uses in ``epoch``.

    Epochs come in cycles of ``v``: each cycle walks a fresh seeded permutation of range(v), so the first
    ``v`` epochs see ``v`` distinct views and no view repeats before all were used. One view per epoch
    (rather than one per sample) is what lets an epoch read exactly 1/V of the store; the views themselves
    are independent per sample, since a view's parameters depend on (seed, sample, view).
    """
    _check_nonneg(epoch=epoch, seed=seed)
    if v < 1:
        raise ValueError(f"v must be at least 1, got {v}")
    cycle, step = divmod(epoch, v)
    permutation = np.random.default_rng([seed, cycle, _VIEW_STREAM]).permutation(v)
    return int(permutation[step])


def random_order(epoch: int, n: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Sample indices (int64) that rank ``rank`` of ``world`` visits in ``epoch``: a seeded permutation of
    range(n), wrapped to a multiple of ``world`` so that every rank gets ceil(n / world) samples, and dealt
    to the ranks in turn (rank r takes positions r, r + world, ...)."""
    _check_nonneg(epoch=epoch, seed=seed)
    if n < 1 or not 0 <= rank < world:
        raise ValueError(f"bad random_order arguments n={n} rank={rank} world={world}")
    order = np.random.default_rng([seed, epoch, _RANDOM_STREAM]).permutation(n)
    if world == 1:
        return order
    return np.resize(order, -(-n // world) * world)[rank::world]


def chunked_order(epoch: int, n: int, chunk: int, seed: int, rank: int = 0, world: int = 1,
                window: int = 4) -> np.ndarray:
    """Sample indices (int64) that rank ``rank`` of ``world`` visits in ``epoch``, in visiting order.

    The whole epoch's order is a chunk-aware permutation of range(n) (see the module docstring); rank r
    takes the r-th contiguous share of it, so each rank keeps the chunk locality. Every rank gets
    ceil(n / world) samples: like torch's DistributedSampler, the order wraps around to pad the last
    shares, so with world > 1 up to world - 1 samples appear twice in an epoch.
    """
    _check_nonneg(epoch=epoch, seed=seed)
    if n < 1 or chunk < 1 or window < 1 or not 0 <= rank < world:
        raise ValueError(f"bad chunked_order arguments n={n} chunk={chunk} window={window} "
                         f"rank={rank} world={world}")
    rng = np.random.default_rng([seed, epoch, _ORDER_STREAM])
    n_chunks = -(-n // chunk)
    place = np.empty(n_chunks, dtype=np.int64)
    place[rng.permutation(n_chunks)] = np.arange(n_chunks)  # where each chunk lands in the shuffle
    window_of = place[np.arange(n) // chunk] // window
    order = np.lexsort((rng.random(n), window_of)).astype(np.int64)  # by window, random within it
    share = -(-n // world)
    return np.resize(order, share * world)[rank * share:(rank + 1) * share]


class Step(NamedTuple):
    """One batch of a planned epoch: positions [start, stop) of the order, the chunks to read before it
    and the chunks that can be dropped after it."""

    start: int
    stop: int
    load: np.ndarray
    evict: np.ndarray


def chunk_plan(order: np.ndarray, chunk: int, batch_size: int, horizon: int) -> list[Step]:
    """Plan which chunks to hold for each batch of ``order``, keeping memory bounded.

    A chunk is read at the first batch that needs it and dropped after a batch unless one of its samples
    comes again within ``horizon`` positions (use the window size in samples: then the quasi-random order
    reads each chunk once). A chunk needed again later than that is simply read again.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    chunks = np.asarray(order, dtype=np.int64) // chunk
    following = _next_use(chunks)
    held: set[int] = set()
    steps = []
    for start in range(0, len(chunks), batch_size):
        stop = min(len(chunks), start + batch_size)
        used, last_rev = np.unique(chunks[start:stop][::-1], return_index=True)
        last = stop - 1 - last_rev
        load = np.array([c for c in used.tolist() if c not in held], dtype=np.int64)
        evict = used[following[last] >= stop + horizon]
        held.update(load.tolist())
        held.difference_update(evict.tolist())
        steps.append(Step(start, stop, load, evict))
    return steps


def _next_use(chunks: np.ndarray) -> np.ndarray:
    """For each position, the next position that uses the same chunk (a huge number if none)."""
    following = np.full(len(chunks), np.iinfo(np.int64).max, dtype=np.int64)
    by_chunk = np.argsort(chunks, kind="stable")
    same = chunks[by_chunk[1:]] == chunks[by_chunk[:-1]]
    following[by_chunk[:-1][same]] = by_chunk[1:][same]
    return following


def _check_nonneg(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value}")
