"""Write a logit store shard by shard, from one or many ranks, with resume after a crash.

Typical use in the cache stage (every rank runs the same code; rank 0 marks completion after a barrier):

    with StoreWriter.create_or_resume(path, n, v, c, "float16", labels, ids, counts, attrs) as writer:
        for shard in writer.missing_shards(rank, world):
            logits, params = teacher_views(shard.start, shard.stop)   # [n_k, V, C], [n_k, V, P]
            writer.write_shard(shard.index, logits, params)
    barrier()
    if rank == 0:
        writer.mark_complete()
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zarr

from store import codecs
from store.location import RemotePath, create_new, location, zarr_store
from store.manifest import ArtifactError, check_fingerprint, package_versions, write_json_atomic
from store.schema import (COMPLETE, FORMAT_VERSION, META_ARRAYS, RESERVED_ATTRS, Layout, check_format,
                          create_arrays, data_arrays, done_path, done_shards, is_complete, open_attrs,
                          user_attrs)


CREATING = "creating.json"  # an object store's claim on creating a store (``_create_claimed``)


class Shard(NamedTuple):
    """Shard ``index`` holds all V views of sample rows [start, stop)."""

    index: int
    start: int
    stop: int


class StoreWriter:
    """Writes whole shards through a bounded queue and one background thread; see the module docstring."""

    def __init__(self, path: Path, layout: Layout, queue_size: int = 2):
        self.path = path
        self.layout = layout
        self._group = zarr.open_group(zarr_store(path), mode="r+")
        self._arrays = {name: self._group[name] for name in data_arrays(layout)}
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike, n: int, v: int, c: int, codec: str,
                         labels: np.ndarray, ids: np.ndarray, class_counts: np.ndarray, attrs: dict,
                         p: int = 8, *, chunk: int | None = None, shard: int | None = None,
                         queue_size: int = 2, k: int = 0, checksums: bool = True) -> "StoreWriter":
        """Create the store at ``path``, or reopen an incomplete one made with the same inputs.

        ``attrs`` must hold ``recipe``, ``view_spec`` and ``fingerprints`` (a dict); other keys are stored
        too. Reopening compares shape, codec, chunking, attributes and the labels/ids/class_counts arrays,
        and raises ArtifactError naming what differs; a complete store is never reopened for writing.
        Safe to call from every rank at once: the store is built in a temporary folder and renamed into
        place, so exactly one rank creates it and the others resume it. ``checksums`` False exists for
        ``make bench-cache`` only, to measure what the crc32c costs.
        """
        path = location(path)
        layout = Layout.choose(n, v, c, p, codecs.check(codec), chunk, shard, k)
        wanted = user_attrs(attrs)
        if not (path / "zarr.json").is_file():
            create = _create_atomically if isinstance(path, Path) else _create_claimed
            create(path, layout, wanted, labels, ids, class_counts, checksums)
        _check_resumable(path, layout, wanted, {"labels": labels, "ids": ids, "class_counts": class_counts},
                         explicit_chunking=(chunk is not None, shard is not None))
        stored = Layout(**open_attrs(path)["layout"])
        return cls(path, stored, queue_size)

    def shard_ranges(self) -> list[Shard]:
        """Every shard of the store, in order."""
        return [Shard(k, *self.layout.shard_range(k)) for k in range(self.layout.n_shards)]

    def missing_shards(self, rank: int = 0, world: int = 1) -> list[Shard]:
        """The shards rank ``rank`` of ``world`` still has to write: shard k belongs to rank k % world."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        done = done_shards(self.path)
        return [s for s in self.shard_ranges() if s.index % world == rank and s.index not in done]

    def write_shard(self, k: int, logits: np.ndarray, params: np.ndarray) -> None:
        """Queue shard ``k`` (logits [n_k, V, C], params [n_k, V, P]) for the background writer.

        Blocks only while the queue is full, i.e. when the disk falls behind. The writer takes the arrays
        over: do not modify them after this call. Raises the writer thread's error, if it had one.
        """
        self._raise_pending()
        start, stop = self.layout.shard_range(k)
        logits = np.asarray(logits, dtype=np.float32)
        params = np.asarray(params, dtype=np.float32)
        rows, lay = stop - start, self.layout
        if logits.shape != (rows, lay.v, lay.c) or params.shape != (rows, lay.v, lay.p):
            raise ValueError(f"shard {k} needs logits {(rows, lay.v, lay.c)} and params "
                             f"{(rows, lay.v, lay.p)}, got {logits.shape} and {params.shape}")
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="store-writer", daemon=True)
            self._thread.start()
        self._queue.put((k, logits, params))

    def close(self) -> None:
        """Wait until every queued shard is written, then re-raise any error of the writer thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_pending()

    def mark_complete(self) -> Path:
        """Verify that every shard is done and write the completion marker (rank 0, after all ranks)."""
        self.close()
        missing = sorted(set(range(self.layout.n_shards)) - done_shards(self.path))
        if missing:
            raise ArtifactError(
                f"cannot mark {self.path} complete: {len(missing)} of {self.layout.n_shards} shards are not "
                f"written (first: {missing[:5]}). Rerun the cache stage to resume the missing shards.")
        attrs = open_attrs(self.path)
        marker = self.path / COMPLETE
        write_json_atomic(marker, {"format_version": FORMAT_VERSION, "layout": self.layout.to_dict(),
                                   "fingerprints": attrs["fingerprints"], "shards": self.layout.n_shards})
        return marker

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: finish what was queued, but keep the original error
            try:
                self.close()
            except Exception:
                pass

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after a failure, keep consuming so the producer never blocks
                try:
                    self._write_now(*item)
                except BaseException as error:
                    self._error = error

    def _write_now(self, k: int, logits: np.ndarray, params: np.ndarray) -> None:
        start, stop = self.layout.shard_range(k)
        files = [self.path / name / array.metadata.encode_chunk_key((k, 0, 0))  # its shard's one file
                 for name, array in self._arrays.items()]
        for file in files:  # a killed earlier attempt may have left half a shard; start from nothing
            file.unlink(missing_ok=True)
        parts = codecs.encode(logits, self.layout.codec, self.layout.k, seed=k)  # k: the shard
        parts["params"] = params
        for name, array in self._arrays.items():
            array[start:stop] = parts[name]
        for file in files:  # the data must be on disk before the marker that vouches for it
            _fsync(file)
        write_json_atomic(done_path(self.path, k), {"shard": k, "start": start, "stop": stop})

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise ArtifactError(f"writing {self.path} failed: {error}") from error


def _fsync(file) -> None:
    if isinstance(file, Path) and file.is_file():  # an object is durable once written; zarr skips a shard
        # whose chunks all equal the fill value
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _build(where, layout: Layout, attrs: dict, labels, ids, class_counts, checksums: bool) -> None:
    """The empty store, its attributes and small arrays, at ``where`` (a folder name or a zarr store)."""
    meta = {"format_version": FORMAT_VERSION, "codec": layout.codec, "layout": layout.to_dict(),
            "versions": package_versions(), **attrs}
    create_arrays(zarr.open_group(where, mode="w", attributes=meta), layout, labels, ids, class_counts, checksums)


def _create_atomically(path: Path, layout: Layout, attrs: dict, labels, ids, class_counts,
                       checksums: bool = True) -> None:
    """Build the empty store in a temporary folder beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        _build(str(tmp), layout, attrs, labels, ids, class_counts, checksums)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "zarr.json").is_file():
                raise  # not a lost race with another rank: a real problem with ``path``
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _create_claimed(path: RemotePath, layout: Layout, attrs: dict, labels, ids, class_counts,
                    checksums: bool = True, wait_seconds: float = 120) -> None:
    """On an object store, where there is no rename: the rank whose conditional PUT of ``creating.json``
    succeeds builds the store in place and then removes the claim; the others wait for the claim to go."""
    import socket
    import time

    claim = path / CREATING
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
    if create_new(claim, mine):
        try:
            _build(zarr_store(path), layout, attrs, labels, ids, class_counts, checksums)
        finally:
            claim.unlink(missing_ok=True)
        return
    deadline = time.time() + wait_seconds
    while claim.is_file():
        if time.time() > deadline:
            raise ArtifactError(f"{path} has been being created by another process for {wait_seconds:.0f}s "
                                f"({claim.read_text()}); if that process is gone, delete {claim} and run again.")
        time.sleep(0.5)


def _check_resumable(path: Path, layout: Layout, attrs: dict, meta: dict, explicit_chunking) -> None:
    """Raise ArtifactError unless the store at ``path`` is incomplete and was made with these inputs."""
    stored = open_attrs(path)
    check_format(path, stored)
    if (path / CREATING).is_file():
        raise ArtifactError(f"{path} was left half-created by a process that died ({(path / CREATING).read_text()}); "
                            f"delete {path} and run again.")
    if is_complete(path):
        raise ArtifactError(f"{path} is already a complete logit store; it is never reopened for writing. "
                            f"Read it with LogitStore.open, or delete it to dump again.")
    have = {"k": 0, **stored["layout"]}  # stores from before codec topk have no k
    chunking = [key for key, given in zip(("chunk", "shard"), explicit_chunking) if given]
    for key in ["n", "v", "c", "p", "codec", "k", *chunking]:
        if have[key] != getattr(layout, key):
            _differs(path, key, have[key], getattr(layout, key))
    have_fp, want_fp = stored["fingerprints"], attrs["fingerprints"]
    for key in sorted(set(have_fp) | set(want_fp)):
        check_fingerprint(key, have_fp.get(key, "<none>"), want_fp.get(key, "<none>"), str(path))
    for key in sorted((set(stored) | set(attrs)) - set(RESERVED_ATTRS)):
        if stored.get(key) != attrs.get(key):
            _differs(path, f"attribute {key!r}", stored.get(key), attrs.get(key))
    group = zarr.open_group(zarr_store(path, read_only=True), mode="r")
    for name in META_ARRAYS:
        have_values, want_values = group[name][:], np.asarray(meta[name])
        if not np.array_equal(have_values, want_values):
            raise ArtifactError(f"{path} was started with other {name} ({have_values.shape} stored, "
                                f"{want_values.shape} given). Resume it with the original inputs, or delete "
                                f"it to start over.")


def _differs(path: Path, what: str, stored, wanted) -> None:
    raise ArtifactError(f"{path} was started with {what} = {stored!r}, this run asks for {wanted!r}. "
                        f"Resume it with the original inputs, or delete it to start over.")


def invalidate_damaged(path: Path, meta: dict[str, np.ndarray], log=print) -> list[int]:
    """Prepare a store with damaged chunks for a resume that repairs it: check every chunk, rewrite damaged
    ``labels`` / ``ids`` / ``class_counts`` from ``meta``, and drop the done markers (and the completion
    marker) of the shards holding a damaged chunk, so that resuming re-dumps exactly those. Returns them."""
    from store.reader import LogitStore, is_checksum_error
    from store.verify import damaged_chunks

    path = location(path)
    attrs = open_attrs(path)
    check_format(path, attrs)
    group = zarr.open_group(zarr_store(path), mode="r+")
    fixed = []
    for name in META_ARRAYS:
        try:
            group[name][:]
        except ValueError as error:
            if not is_checksum_error(error):
                raise
            group[name][:] = np.asarray(meta[name], dtype=np.int64)
            fixed.append(name)
    shards = sorted({d.shard for d in damaged_chunks(LogitStore(path, attrs))})
    for k in shards:
        done_path(path, k).unlink(missing_ok=True)
    if shards or fixed:
        (path / COMPLETE).unlink(missing_ok=True)
        log(f"repair: {path}: rewrote {', '.join(fixed) or 'no metadata array'}; "
            f"{len(shards)} shard(s) to re-dump: {shards[:20]}")
    else:
        log(f"repair: {path}: every chunk's checksum holds; nothing to repair")
    return shards
