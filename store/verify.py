"""Check a logit store without trusting it: completeness, format, the consistency of shapes and metadata, and
the crc32c of every stored chunk. ``stages.verify`` adds the fingerprints and the teacher replay.

Every problem is collected rather than raised, so one run names all of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from store.manifest import ArtifactError
from store.reader import DamagedChunk, LogitStore, is_checksum_error
from store.schema import COMPLETE, Layout, check_format, data_arrays, done_shards, open_attrs


def chunk_reads(store: LogitStore) -> Iterator[tuple[str, int, int, int | None]]:
    """(array, first row, stop row, view or None for all views) of every stored chunk of the data arrays."""
    for name in data_arrays(store.layout):
        one_view = store.layout.per_view(name)
        size = store.chunk if one_view else store.layout.shard
        for first in range(0, store.n, size):
            for view in (range(store.v) if one_view else (None,)):
                yield name, first, min(store.n, first + size), view


def damaged_chunks(store: LogitStore, progress: Callable[[int, int], None] | None = None) -> list[DamagedChunk]:
    """Every data chunk whose checksum fails, found by reading each chunk once."""
    reads = list(chunk_reads(store))
    found = []
    for k, (name, first, stop, view) in enumerate(reads):
        array = store.array(name)
        try:
            array[first:stop] if view is None else array[first:stop, view]
        except ValueError as error:
            if not is_checksum_error(error):
                raise
            found.append(DamagedChunk(store.path, name, (first, stop), view, first // store.layout.shard))
        if progress:
            progress(k + 1, len(reads))
    return found


def check_store(path: Path, progress=None) -> tuple[list[str], LogitStore | None, int]:
    """(failures, the store if it could be opened, chunks checked) of the store at ``path``."""
    try:
        attrs = open_attrs(path)
        check_format(path, attrs)
        layout = Layout(**attrs["layout"])
    except (ArtifactError, KeyError, TypeError) as error:
        return [f"cannot read the store's metadata: {error}"], None, 0
    failures = []
    if not (path / COMPLETE).is_file():
        failures.append(f"incomplete: no {COMPLETE} (the dump was interrupted or is running); `make cache` resumes it")
    missing = sorted(set(range(layout.n_shards)) - done_shards(path))
    if missing:
        failures.append(f"incomplete: {len(missing)} of {layout.n_shards} shards have no done marker "
                        f"(first: {missing[:5]})")
    try:
        store = LogitStore(path, attrs)
    except DamagedChunk as error:
        return failures + [str(error)], None, 0
    failures += shape_problems(store)
    damaged = damaged_chunks(store, progress)
    failures += [str(error) for error in damaged]
    return failures, store, sum(1 for _ in chunk_reads(store))


def shape_problems(store: LogitStore) -> list[str]:
    """Arrays whose shape or dtype disagrees with the layout, and per-sample metadata that disagrees with itself."""
    lay, problems = store.layout, []
    for name, (dtype, width) in data_arrays(lay).items():
        array = store.array(name)
        if array.shape != (lay.n, lay.v, width) or array.dtype != np.dtype(dtype):
            problems.append(f"array {name!r} is {array.dtype} {array.shape}; the layout says {dtype} "
                            f"{(lay.n, lay.v, width)}")
    if store.labels.shape != (lay.n,) or store.ids.shape != (lay.n,) or store.class_counts.shape != (lay.c,):
        problems.append(f"labels {store.labels.shape}, ids {store.ids.shape} and class_counts "
                        f"{store.class_counts.shape} do not match n = {lay.n} and c = {lay.c}")
        return problems
    if len(np.unique(store.ids)) != lay.n:
        problems.append("ids repeat: two stored rows claim the same training sample")
    if store.labels.min() < 0 or store.labels.max() >= lay.c:
        problems.append(f"labels outside 0..{lay.c - 1}")
    elif not np.array_equal(np.bincount(store.labels, minlength=lay.c), store.class_counts):
        problems.append("class_counts differ from the counts of the stored labels")
    return problems
