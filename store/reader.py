"""Read a complete logit store, read-only: random access with ``read`` and epoch streaming with ``stream``.

Typical use in the student stage:

    store = LogitStore.open(path, expect={"teacher": teacher_sha, "samples": samples_sha})
    for index, views, logits, params in store.stream(epoch, seed, batch_size, rank, world):
        labels = store.labels[index]
        ...   # replay the views from params, soft targets from logits / tau
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr

from store import codecs
from store.location import location, zarr_store
from store.manifest import ArtifactError, check_fingerprint
from store.order import chunk_plan, chunked_order, view_for_epoch
from store.prefetch import prefetched
from store.schema import META_ARRAYS, Layout, check_format, data_arrays, is_complete, open_attrs

Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class DamagedChunk(ArtifactError):
    """A stored chunk whose crc32c does not match its bytes: ``array``, the chunk's sample ``rows`` [start,
    stop), its ``view`` (None: a chunk holding every view) and the writer ``shard`` it belongs to."""

    def __init__(self, path: Path, array: str, rows: tuple[int, int], view: int | None, shard: int | None):
        self.path, self.array, self.rows, self.view, self.shard = path, array, rows, view, shard
        where = f"view {view}" if view is not None else "all views"
        what = f"shard {shard}" if shard is not None else f"the {array} array"
        super().__init__(
            f"{path}: a damaged chunk of {array!r}: sample rows {rows[0]}..{rows[1] - 1}, {where} ({what}); its "
            f"crc32c does not match its bytes, so the disk or a copy changed it. Repair the cache: "
            f"`make cache REPAIR=1` (or `dive cache --teacher TEACHER --repair`) checks every chunk and re-dumps "
            f"only the damaged shards; `make verify` lists every damaged chunk.")


def is_checksum_error(error: BaseException) -> bool:
    """zarr's crc32c codec raises a plain ValueError on a mismatch; this tells it from other ValueErrors."""
    return isinstance(error, ValueError) and "checksum" in str(error)


class LogitStore:
    """A complete logit store opened read-only. Only the small per-sample arrays are held in memory."""

    def __init__(self, path: Path, attrs: dict, sharpness: float | None = None):
        self.path = path
        self.attrs = attrs
        self.sharpness = sharpness  # p / tau of the targets to be made; needed by codecs topk and sampled only
        self.layout = Layout(**attrs["layout"])
        group = zarr.open_group(zarr_store(path, read_only=True), mode="r")
        self._arrays = {name: group[name] for name in data_arrays(self.layout)}
        self.labels, self.ids, self.class_counts = (self._whole(group, name) for name in META_ARRAYS)

    def array(self, name: str) -> zarr.Array:
        """The zarr array of the per-sample-view data ``name`` (``logits``, ``params`` ...), for checks that walk
        its chunks (``store.verify``); readers use ``read`` and ``read_stored``, which name damaged chunks."""
        return self._arrays[name]

    def _whole(self, group: zarr.Group, name: str) -> np.ndarray:
        try:
            return group[name][:]
        except ValueError as error:
            if not is_checksum_error(error):
                raise
            size = self.layout.c if name == "class_counts" else self.layout.n
            raise DamagedChunk(self.path, name, (0, size), None, None) from error

    @classmethod
    def open(cls, path: str | os.PathLike, expect: dict[str, str] | None = None,
             sharpness: float | None = None) -> "LogitStore":
        """Open the store at ``path``, refusing (ArtifactError) a store that is missing, of another format
        version, incomplete, or whose fingerprints differ from ``expect`` (name -> sha256). ``sharpness``
        (p / tau) is what a topk store decodes for; the dense codecs ignore it. ``path`` is a folder or a URL
        (``store.location``)."""
        path = location(path)
        attrs = open_attrs(path)
        check_format(path, attrs)
        if not is_complete(path):
            raise ArtifactError(
                f"{path} is an incomplete logit store (no completion marker): its dump was interrupted or "
                f"is still running. Rerun the cache stage (`make cache`) to resume and finish it.")
        found = attrs.get("fingerprints", {})
        for name, value in (expect or {}).items():
            check_fingerprint(name, value, found.get(name, "<none>"), str(path))
        return cls(path, attrs, sharpness)

    n = property(lambda self: self.layout.n, doc="number of samples")
    v = property(lambda self: self.layout.v, doc="views per sample")
    c = property(lambda self: self.layout.c, doc="classes")
    p = property(lambda self: self.layout.p, doc="parameters per view")
    codec = property(lambda self: self.layout.codec, doc="logit codec: float16, int8 or topk")
    k = property(lambda self: self.layout.k, doc="logits kept per view by codec topk (0: all)")
    chunk = property(lambda self: self.layout.chunk, doc="samples per inner chunk")
    fingerprints = property(lambda self: dict(self.attrs["fingerprints"]), doc="input fingerprints")

    def read(self, index, views) -> tuple[np.ndarray, np.ndarray]:
        """Logits float32 [B, C] and params float32 [B, P] of samples ``index`` at views ``views``
        (an array like ``index``, or one view for all). Reads only the chunks these rows live in."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        views = np.broadcast_to(np.asarray(views, dtype=np.int64), index.shape)
        if index.size and (index.min() < 0 or index.max() >= self.n or views.min() < 0
                           or views.max() >= self.v):
            raise IndexError(f"sample indices must be in [0, {self.n}) and views in [0, {self.v})")
        logits = np.empty((index.size, self.c), dtype=np.float32)
        params = np.empty((index.size, self.p), dtype=np.float32)
        keys = (index // self.chunk) * self.v + views
        for key in np.unique(keys):
            rows = np.flatnonzero(keys == key)
            first, last = index[rows].min(), index[rows].max()
            block_logits, block_params = self.read_rows(first, last + 1, int(key % self.v))
            logits[rows] = block_logits[index[rows] - first]
            params[rows] = block_params[index[rows] - first]
        return logits, params

    def read_rows(self, start: int, stop: int, view: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded logits float32 [stop - start, C] and params [stop - start, P] of one view."""
        return self._decode(self._read_raw(start, stop, view))

    def read_stored(self, start: int, stop: int, view: int) -> dict[str, np.ndarray]:
        """The stored arrays of rows [start, stop) of one view, still encoded (name -> array)."""
        return self._read_raw(start, stop, view)

    def decode(self, parts: dict[str, np.ndarray], sharpness: float | None = None) -> np.ndarray:
        """float32 logits [..., C] of stored ``parts``, for ``sharpness`` (default: the store's own)."""
        sharpness = self.sharpness if sharpness is None else sharpness
        return codecs.decode(parts, self.codec, self.c, self.k, sharpness)

    def stream(self, epoch: int, seed: int, batch_size: int, rank: int = 0, world: int = 1,
               prefetch: int = 2, window: int = 4, workers: int = 4) -> Iterator[Batch]:
        """Batches (index int64 [B], views int64 [B], logits float32 [B, C], params float32 [B, P]) of one
        epoch for rank ``rank`` of ``world``: view ``view_for_epoch(epoch)`` of each sample of
        ``chunked_order(...)``. Whole chunks are read by ``workers`` threads (zarr reads are latency-bound,
        so more than the cores helps) about one window ahead, and a background thread keeps ``prefetch``
        batches ready. Memory: about three windows of stored chunks (3 x 4 x 4 MiB at iNaturalist) plus
        the prefetched batches. The last batch may be short.
        """
        view = view_for_epoch(epoch, self.v, seed)
        order = chunked_order(epoch, self.n, self.chunk, seed, rank, world, window)
        plan = chunk_plan(order, self.chunk, batch_size, horizon=window * self.chunk)
        # Read ahead by about one window of batches, so that the next window's chunks are read while
        # this one is served, instead of in a burst that stalls the consumer.
        ahead = max(1, (window * self.chunk) // batch_size)

        def produce() -> Iterator[Batch]:
            held: dict[int, dict[str, np.ndarray]] = {}
            pending: dict[tuple[int, int], Future] = {}
            with ThreadPoolExecutor(max(1, workers), thread_name_prefix="store-read") as pool:
                def submit(j: int) -> None:
                    for c in plan[j].load.tolist() if j < len(plan) else ():
                        pending[j, c] = pool.submit(self._read_chunk, c, view)
                for j in range(ahead):
                    submit(j)
                for j, step in enumerate(plan):
                    held.update((c, pending.pop((j, c)).result()) for c in step.load.tolist())
                    submit(j + ahead)
                    index = order[step.start:step.stop]
                    logits, params = self._decode(self._gather(held, index))
                    yield index, np.full(index.shape, view, dtype=np.int64), logits, params
                    for c in step.evict.tolist():
                        del held[c]

        return prefetched(produce, prefetch, name="store")

    def _read_raw(self, start: int, stop: int, view: int) -> dict[str, np.ndarray]:
        out = {}
        for name, array in self._arrays.items():
            try:
                out[name] = array[start:stop, view]
            except ValueError as error:
                if not is_checksum_error(error):
                    raise
                raise self.damaged(name, start, stop, view) from error
        return out

    def chunk_rows(self, name: str, start: int) -> tuple[int, int, bool]:
        """The sample rows [first, stop) of the stored chunk of ``name`` that holds row ``start``, and whether
        that chunk holds one view (else all views)."""
        size = self.chunk if self.layout.per_view(name) else self.layout.shard
        first = start // size * size
        return first, min(self.n, first + size), self.layout.per_view(name)

    def damaged(self, name: str, start: int, stop: int, view: int) -> DamagedChunk:
        """The first damaged chunk of ``name`` among rows [start, stop) of ``view``, found chunk by chunk."""
        array, row = self._arrays[name], start
        while row < stop:
            first, end, one_view = self.chunk_rows(name, row)
            try:
                array[first:end, view]
            except ValueError as error:
                if is_checksum_error(error):
                    return DamagedChunk(self.path, name, (first, end), view if one_view else None,
                                        first // self.layout.shard)
                raise
            row = end
        return DamagedChunk(self.path, name, (start, stop), view, start // self.layout.shard)

    def _read_chunk(self, c: int, view: int) -> dict[str, np.ndarray]:
        return self._read_raw(c * self.chunk, min(self.n, (c + 1) * self.chunk), view)

    def _decode(self, parts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.decode(parts), parts["params"]

    def _gather(self, held: dict, index: np.ndarray) -> dict[str, np.ndarray]:
        """The stored rows of ``index`` from the held chunks, still encoded: decoding after the gather
        touches each value once."""
        some = next(iter(held.values()))
        out = {name: np.empty((index.size, *part.shape[1:]), part.dtype) for name, part in some.items()}
        chunks, rows = np.divmod(index, self.chunk)
        for c in np.unique(chunks).tolist():
            mine = chunks == c
            for name, part in held[c].items():
                out[name][mine] = part[rows[mine]]
        return out
