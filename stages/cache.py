"""The cache stage: run the trained teacher once over V recorded views of every training image and write
its raw logits, with each view's parameters, to a chunked Zarr store (``logits.zarr``).

Each rank (under torchrun) computes whole shards of the store, disjoint between ranks, and hands them to
the store's background writer, so teacher compute overlaps the disk. A killed dump resumes with the
shards that are missing; ``manifest.json`` is written last, after the store's own completion marker.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.data.loaders import make_executor, one_cpu_thread
from pipeline.data.sources import Source, load_source
from pipeline.data.targets import row_order
from pipeline.data.views import P, ViewSpec, view_params
from pipeline.device import autocast, to_device
from pipeline.settings import CacheSettings, TeacherSettings
from pipeline.train.distributed import Dist, barrier, init_from_env
from store import codecs
from store.lock import DumpLock
from store.manifest import MANIFEST, ArtifactError, check_fingerprint, read_manifest, sha256_file, write_manifest
from store.plan import plan_store
from store.prefetch import prefetched
from store.reader import LogitStore
from store.writer import Shard, StoreWriter, invalidate_damaged

from .artifacts import EXPERT_STORE, STORE, load_teacher, prepare_run_dir, runtime_record, store_folder, teacher_of


def identity(teacher: TeacherSettings, cache: CacheSettings, teacher_sha: str) -> dict:
    """What a cache is: its teacher's settings and weights, and its own settings without the runtime keys."""
    return {"stage": "cache", "teacher": teacher.identity(), "cache": cache.identity(), "teacher_sha256": teacher_sha}


def planned_bytes(n: int, v: int, c: int, codec: str, k: int = 0) -> int:
    """Bytes the store will take (``store.plan``), refusing a K that codec topk cannot store for ``c``."""
    try:
        return plan_store(n, v, c, codec, k, P).total_bytes
    except ValueError as error:
        raise ArtifactError(f"cache settings: {error}") from None


def check_room(out: Path, need: int, log) -> None:
    """Print the planned size and refuse to start when the disk lacks the room."""
    free = shutil.disk_usage(out if out.exists() else out.parent).free
    log(f"cache: the store will take {need / 2**20:,.1f} MiB; {free / 2**30:,.1f} GiB free at {out}")
    if need * 1.05 > free:
        raise ArtifactError(f"not enough disk for the cache at {out}: it needs {need / 2**30:.2f} GiB and "
                            f"{free / 2**30:.2f} GiB are free. Free space, lower views= (V), or use codec=int8.")


@torch.no_grad()
def teacher_logits(model, images: torch.Tensor, cache: CacheSettings, device: torch.device,
                   experts: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw teacher logits (float32) of one batch of views; with ``experts``, also a RIDE teacher's
    per-expert logits [B, E * C] (expert-major)."""
    with autocast(device, cache.bf16):
        result = model(to_device(images, device, cache.channels_last))
    logits = result["logits"].float().cpu().numpy()
    if not experts:
        return logits, None
    e = result["expert_logits"].float().permute(1, 0, 2)  # [B, E, C]
    return logits, e.reshape(e.shape[0], -1).cpu().numpy()


def shard_views(spec: ViewSpec, cache: CacheSettings, executor, positions: np.ndarray) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """Every (sample, view) pair of the samples at ``positions``: their indices and view parameters,
    sample-major."""
    index = np.repeat(positions, cache.views)
    views = np.tile(np.arange(cache.views), len(positions))
    params = view_params(spec, cache.view_seed, index, views, *executor.sizes(index))
    return index, params


@dataclasses.dataclass
class ShardBatch:
    """One batch of a shard's views, made ahead of the teacher: ``params`` are the whole shard's, and
    ``last`` marks the batch that completes it."""
    shard: Shard
    params: np.ndarray
    images: torch.Tensor
    last: bool


def shard_batches(spec: ViewSpec, cache: CacheSettings, executor, rows: np.ndarray,
                  shards: list[Shard]) -> Iterator[ShardBatch]:
    """The view batches of ``shards`` in order (store row r holds sample ``rows[r]``)."""
    for shard in shards:
        index, params = shard_views(spec, cache, executor, rows[shard.start:shard.stop])
        for start in range(0, len(index), cache.batch_size):
            sl = slice(start, start + cache.batch_size)
            yield ShardBatch(shard, params, executor.run(index[sl], params[sl]), sl.stop >= len(index))


def dump(spec: ViewSpec, cache: CacheSettings, model, executor, writer: StoreWriter, rows: np.ndarray, dist: Dist, log,
         expert_writer: StoreWriter | None = None) -> int:
    """Compute and queue every shard this rank still owns (store row r holds sample ``rows[r]``), into the
    logit store and, if given, the per-expert store (each gets the shards it lacks); returns the images run.

    Three stages overlap: a prefetching thread reads, decodes and replays the next batches of views, this
    thread runs the teacher, and the store's writer encodes and writes finished shards in its own thread.
    A bad image stops the dump with its name, after the shards before it were written.
    """
    main_todo = {s.index: s for s in writer.missing_shards(dist.rank, dist.world)}
    expert_todo = {s.index: s for s in expert_writer.missing_shards(dist.rank, dist.world)} if expert_writer else {}
    shards = {**expert_todo, **main_todo}
    todo = [shards[k] for k in sorted(shards)]
    total = sum(s.stop - s.start for s in todo) * cache.views
    done, start_time = 0, time.perf_counter()
    if dist.main and len(todo) < writer.layout.n_shards // dist.world:
        log(f"cache: resuming, {len(todo)} shards left for this rank")
    batches = prefetched(lambda: shard_batches(spec, cache, executor, rows, todo), cache.prefetch, "dump",
                         on_start=one_cpu_thread)
    logits, per_expert = [], []
    with writer, (expert_writer or contextlib.nullcontext()), contextlib.closing(batches):
        # on any error, the shards already queued are still written
        for part in batches:
            shard = part.shard
            z, e = teacher_logits(model, part.images, cache, dist.device, experts=shard.index in expert_todo)
            logits.append(z)
            per_expert.append(e)
            done += len(z)
            if not part.last:
                continue
            n = shard.stop - shard.start
            views = part.params.reshape(n, cache.views, P)
            if shard.index in main_todo:
                writer.write_shard(shard.index, np.concatenate(logits).reshape(n, cache.views, -1), views)
            if shard.index in expert_todo:
                expert_writer.write_shard(shard.index, np.concatenate(per_expert).reshape(n, cache.views, -1), views)
            logits, per_expert = [], []
            rate = done / (time.perf_counter() - start_time)
            if dist.main:
                log(f"cache: shard {shard.index + 1}/{writer.layout.n_shards}  {done:,}/{total:,} views  "
                    f"{rate * dist.world:,.0f} img/s  ETA {(total - done) / max(rate, 1e-9):,.0f}s", flush=True)
    return done


def run(teacher_dir: Path, out: Path, cache: CacheSettings, data_root: Path | None = None,
        device: str = "auto", log=print, repair: bool = False, store_url: str | None = None):
    """Dump the teacher's logits for V views of every training image into ``out / logits.zarr``. With
    ``repair``, first check every chunk of an existing store and re-dump the shards whose checksum fails.

    One dump at a time: the main rank holds ``dump.lock`` beside the store (``store.lock``) while it is
    written. With ``store_url`` the stores go to that object-store prefix (``artifacts.store_folder``) and
    ``out`` keeps the small files; the manifest records where the store is."""
    dist = init_from_env(device)
    teacher = teacher_of(teacher_dir)
    teacher_manifest = read_manifest(teacher_dir, "teacher")
    source = load_source(teacher.dataset, data_root, teacher.imbalance, teacher.classes)
    check_fingerprint("dataset sample list", teacher_manifest["inputs"]["train_samples"], source.fingerprint(),
                      f"teacher {teacher_dir} and dataset {teacher.dataset}")
    teacher_sha = sha256_file(teacher_dir / "model.pt")
    n, c, v = len(source.train), source.num_classes, cache.views
    need = planned_bytes(n, v, c, cache.codec, cache.k)  # refuses a bad K before the run folder is made
    rows = row_order(n, cache.view_seed)
    labels, ids = source.train.labels[rows], source.train.ids[rows]
    stores = store_folder(out, store_url)
    lock = DumpLock(stores)
    if dist.main and (stores / STORE / "zarr.json").is_file():
        lock.acquire()  # before anything is checked or changed: a dump may be writing it
        if repair and invalidate_damaged(stores / STORE, {"labels": labels, "ids": ids,
                                                       "class_counts": source.class_counts}, log):
            (out / MANIFEST).unlink(missing_ok=True)
    barrier(dist)  # every rank sees the repaired state before it decides whether there is work
    if prepare_run_dir(out, identity(teacher, cache, teacher_sha)):
        lock.release()
        log(f"{out} is complete; nothing to do")
        return stores / STORE
    if dist.main and not lock.held:
        lock.acquire()
    try:
        return _dump_store(teacher_dir, out, stores, cache, teacher, source, teacher_sha, rows, labels, ids, need,
                           dist, log)
    finally:
        lock.release()


def _dump_store(teacher_dir: Path, out: Path, stores, cache: CacheSettings, teacher, source, teacher_sha: str,
                rows: np.ndarray, labels: np.ndarray, ids: np.ndarray, need: int, dist: Dist, log):
    n, c, v = len(source.train), source.num_classes, cache.views
    experts = teacher.experts  # 0 for a single model
    if cache.expert_logits and not experts:
        raise ArtifactError(f"expert_logits=true needs a RIDE teacher; {teacher_dir} is a single "
                            f"{teacher.model} model. Drop expert_logits or train the teacher with model=ride.")
    if dist.main:
        if cache.expert_logits:
            extra = planned_bytes(n, v, experts * c, cache.codec)
            log(f"cache: per-expert logits of the {experts} experts add {extra / 2**20:,.1f} MiB ({EXPERT_STORE})")
            need += extra
        if isinstance(stores, Path):  # an object store reports no free space
            check_room(out, need, log)
        log(f"cache: {n:,} images x {v} views of {teacher.dataset}, {c} classes, "
            f"codec {codecs.name(cache.codec, cache.k)}, "
            f"on {dist.device} x{dist.world}")
    spec = teacher.view_spec()
    attrs = {"recipe": {"teacher": teacher.to_dict(), "cache": cache.to_dict()},
             "view_spec": dataclasses.asdict(spec), "view_seed": cache.view_seed,
             "fingerprints": fingerprints(teacher_sha, source),
             "row_order": "seeded permutation of the training split (pipeline.data.targets.row_order); ids name rows"}
    writer = StoreWriter.create_or_resume(stores / STORE, n, v, c, cache.codec, labels, ids, source.class_counts, attrs,
                                          k=cache.k)
    expert_writer = None
    if cache.expert_logits:
        expert_writer = StoreWriter.create_or_resume(
            stores / EXPERT_STORE, n, v, experts * c, cache.codec, labels, ids, np.tile(source.class_counts, experts),
            {**attrs, "experts": experts, "classes": c, "class_axis": "expert-major: expert e, class k at e * C + k"})
    model = load_teacher(teacher_dir, dist.device, cache.channels_last)
    executor = make_executor(source.train, spec, source.mean, source.std, cache.batch_size, cache.workers,
                             dist.device)
    start = time.perf_counter()
    images = dump(spec, cache, model, executor, writer, rows, dist, log, expert_writer)
    barrier(dist)
    if dist.main:
        writer.mark_complete()
        outputs = {STORE: STORE}
        if expert_writer is not None:
            expert_writer.mark_complete()
            outputs[EXPERT_STORE] = EXPERT_STORE
        store = LogitStore.open(stores / STORE, expect=attrs["fingerprints"])
        seconds = time.perf_counter() - start
        size = sum(directory_bytes(stores / name) for name in outputs)
        config = {**identity(teacher, cache, teacher_sha), "runtime": runtime_record(cache, dist),
                  "teacher_dir": str(teacher_dir)}
        write_manifest(out, "cache", config, inputs={"teacher_model": teacher_sha, **attrs["fingerprints"]},
                       outputs=outputs, extra={
                           "layout": store.layout.to_dict(), "seconds": seconds, "images": images, "bytes": size,
                           **({} if isinstance(stores, Path) else {"store": str(stores / STORE)})})
        log(f"cache: wrote {stores / STORE} ({size / 2**20:,.1f} MiB, layout {store.layout.to_dict()}) in "
            f"{seconds:,.0f}s")
    barrier(dist)
    return stores / STORE


def fingerprints(teacher_sha: str, source: Source) -> dict[str, str]:
    """What a cache is bound to: the teacher's weights and the training sample list."""
    return {"teacher": teacher_sha, "samples": source.fingerprint()}


def directory_bytes(path) -> int:
    if isinstance(path, Path):
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return sum(f.stat_size() for f in path.rglob("*"))
