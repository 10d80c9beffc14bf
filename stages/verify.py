"""``dive verify --cache DIR`` (``make verify``): is every byte of a cache the one its dump wrote?

Checks, each reported rather than raised, so one run names every failure:

1. the store: completeness, format version, shapes and per-sample metadata, and every chunk's crc32c
   (``store.verify``);
2. the fingerprints: the teacher's weights and the dataset's training sample list against the ones the store
   was bound to, and the cache's manifest;
3. with ``--replay K``: K random (sample, view) pairs replayed through the teacher and compared with the stored
   logits, to the codec's rounding (float16: equal after rounding the fresh logits to float16; int8: within
   its per-row bound; topk: the same top-K classes, their logits equal after rounding; sampled: that, and
   each drawn tail class's stored logit equal to its fresh one after rounding). The replay uses the
   cache's recorded bf16 and channels_last settings; run it on the kind of device that dumped the cache, as
   bf16 kernels differ between devices (after TinyViT's --check-saved-logits).

The summary ends in PASS, or in FAIL and the list of failures.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data.loaders import make_executor
from pipeline.data.sources import DataError, load_source
from pipeline.analysis.virtual import FLOAT16_RELATIVE
from pipeline.data.targets import positions_of
from pipeline.device import autocast, to_device
from pipeline.train.distributed import init_from_env
from store import codecs, sampled, topk
from store.manifest import ArtifactError, read_manifest, sha256_file
from store.reader import LogitStore
from store.verify import check_store

from .artifacts import load_teacher, store_of
from .inspect import progress_bar
from .student import cache_teacher, teacher_dir_of


def fingerprint_problems(cache_dir: Path, store: LogitStore, data_root: Path | None) -> tuple[list[str], object]:
    """Failures of the cache's manifest and fingerprints, and the dataset source (None if it did not load)."""
    try:
        config = read_manifest(cache_dir, "cache")["config"]
    except ArtifactError as error:
        return [f"cache manifest: {error}"], None
    problems, found = [], store.fingerprints
    teacher_dir = teacher_dir_of(config)
    model = teacher_dir / "model.pt"
    if not model.is_file():
        problems.append(f"the teacher's weights {model} are missing: the teacher fingerprint cannot be checked")
    elif sha256_file(model) != found.get("teacher"):
        problems.append(f"teacher fingerprint mismatch: {model} is not the teacher this cache was dumped from")
    teacher = cache_teacher(cache_dir)
    try:
        source = load_source(teacher.dataset, data_root, teacher.imbalance, teacher.classes)
    except DataError as error:
        return problems + [f"dataset {teacher.dataset} could not be loaded to check its fingerprint: {error}"], None
    if source.fingerprint() != found.get("samples"):
        problems.append(f"samples fingerprint mismatch: the {teacher.dataset} training split here is not the one "
                        f"this cache was dumped from")
    return problems, source


def replay_problems(cache_dir: Path, store: LogitStore, source, pairs: int, device: torch.device,
                    seed: int = 0) -> list[str]:
    """Run the teacher on ``pairs`` random (sample, view) pairs and compare with the stored logits."""
    config = read_manifest(cache_dir, "cache")["config"]
    runtime = config.get("runtime", {})
    bf16, channels_last = runtime.get("bf16", True), runtime.get("channels_last", True)
    teacher = cache_teacher(cache_dir)
    model = load_teacher(teacher_dir_of(config), device, channels_last)
    rng = np.random.default_rng(seed)
    rows = rng.choice(store.n, size=min(pairs, store.n), replace=False)
    views = rng.integers(0, store.v, size=len(rows))
    executor = make_executor(source.train, teacher.view_spec(), source.mean, source.std, len(rows), 1, device)
    problems = []
    for start in range(0, len(rows), 256):
        r, v = rows[start:start + 256], views[start:start + 256]
        rows = [store.read_stored(int(i), int(i) + 1, int(j)) for i, j in zip(r, v)]  # one read a pair
        parts = {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
        images = executor.run(positions_of(store.ids[r], source.train.ids), parts["params"])
        with torch.no_grad(), autocast(device, bf16):
            fresh = model(to_device(images, device, channels_last))["logits"].float().cpu().numpy()
        bad = mismatched(store, parts, fresh)
        problems += [f"replay: sample row {r[i]} view {v[i]}: the teacher now gives logits that differ from the "
                     f"stored ones beyond the codec's rounding" for i in np.flatnonzero(bad)]
    return problems


def mismatched(store: LogitStore, parts: dict, fresh: np.ndarray) -> np.ndarray:
    """Per row, whether the stored logits disagree with ``fresh`` beyond what the codec's rounding allows."""
    if store.codec == "float16":
        return ~np.all(parts["logits"] == fresh.astype(np.float16), axis=1)
    if store.codec == "int8":
        stored = codecs.decode(parts, "int8")
        bound = codecs.int8_error_bound(parts)[:, None] + FLOAT16_RELATIVE * np.abs(fresh)
        return ~np.all(np.abs(stored - fresh) <= bound, axis=1)
    top, index, _ = topk.split(parts["logits"], store.k)
    at = np.take_along_axis(fresh, index, axis=1)
    kth = np.sort(fresh, axis=1)[:, -store.k]
    same_set = np.all(at >= kth[:, None], axis=1)  # the stored classes are the K largest now too (ties aside)
    same = same_set & np.all(top == at.astype(np.float16).astype(np.float32), axis=1)
    if store.codec == "sampled":  # which tail classes were drawn is chance; their logits are not
        drawn, classes = sampled.split_draws(parts["logits"], store.k)
        same &= np.all(drawn == np.take_along_axis(fresh, classes, 1).astype(np.float16).astype(np.float32), axis=1)
    return ~same


def run(cache_dir: Path, replay: int = 0, data_root: Path | None = None, device: str = "auto", log=print) -> bool:
    """Verify the cache in ``cache_dir``; True on PASS. Prints a progress bar, then the summary."""
    start = time.perf_counter()
    path = store_of(Path(cache_dir))
    log(f"verify: {path}")
    failures, store, chunks = check_store(path, progress_bar)
    if store is not None:
        problems, source = fingerprint_problems(Path(cache_dir), store, data_root)
        failures += problems
        if replay and source is not None:
            log(f"verify: replaying {replay} (sample, view) pairs through the teacher")
            failures += replay_problems(Path(cache_dir), store, source, replay, init_from_env(device).device)
    seconds = time.perf_counter() - start
    if failures:
        log(f"verify: FAIL, {len(failures)} problem(s) in {seconds:.0f}s:")
        for failure in failures:
            log(f"  - {failure}")
        return False
    log(f"verify: {chunks:,} chunks, fingerprints and metadata checked"
        + (f", {replay} replayed pairs match" if replay else "") + f" in {seconds:.0f}s: PASS")
    return True
