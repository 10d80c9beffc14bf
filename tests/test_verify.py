"""Trust in a cache: checksummed chunks, `verify`, repair by `cache --repair`, the dump lock, concurrent readers."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from store.lock import DumpLock
from store.manifest import ArtifactError
from store.reader import DamagedChunk, LogitStore
from store.verify import check_store

from .conftest import ALLOC_ENV, REPO, needs_fmnist, run_cli

pytestmark = needs_fmnist


def store_hash(store) -> str:
    """sha256 over every file of a store, names and bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(store)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def copy_cache(small_cache, tmp_path):
    teacher, cache = small_cache
    mine = tmp_path / "cache"
    shutil.copytree(cache, mine)
    return teacher, mine


def flip(path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(data)


def test_verify_passes_a_fresh_cache_and_every_replayed_pair_matches(small_cache):
    _, cache = small_cache
    proc = run_cli("verify", "--cache", str(cache), "--replay", "64")
    assert proc.stdout.strip().endswith("PASS"), proc.stdout
    assert "64 replayed pairs match" in proc.stdout


@pytest.mark.parametrize("array", ["logits", "params"])
def test_a_flipped_byte_stops_verify_and_the_student_and_cache_repair_restores_it(small_cache, tmp_path, array):
    teacher, cache = copy_cache(small_cache, tmp_path)
    store = cache / "logits.zarr"
    before = store_hash(store)
    flip(store / array / "c" / "0" / "0" / "0")
    failures, _, _ = check_store(store)
    damaged = [f for f in failures if "damaged chunk" in f]
    assert len(damaged) == 1 and f"of {array!r}" in damaged[0] and "sample rows 0.." in damaged[0]
    proc = run_cli("verify", "--cache", str(cache), check=False)
    assert proc.returncode == 1 and "FAIL" in proc.stdout and f"a damaged chunk of {array!r}" in proc.stdout
    # a student reads every view within V = 3 epochs, so it meets the damaged one
    proc = run_cli("student", "--cache", str(cache), "--set", "epochs=3", "--set", "warmup_epochs=1",
                   "--out", str(tmp_path / "student"), check=False)
    assert proc.returncode != 0 and f"a damaged chunk of {array!r}" in proc.stderr
    assert "make cache REPAIR=1" in proc.stderr
    proc = run_cli("cache", "--teacher", str(teacher), "--set", "views=3", "--out", str(cache), "--repair")
    assert "1 shard(s) to re-dump: [0]" in proc.stdout
    assert store_hash(store) == before  # the same bytes as the dump that was damaged
    assert run_cli("verify", "--cache", str(cache)).stdout.strip().endswith("PASS")


def test_a_store_of_format_1_is_refused_as_too_old(small_cache, tmp_path):
    _, cache = copy_cache(small_cache, tmp_path)
    zarr.open_group(str(cache / "logits.zarr"), mode="r+").attrs["format_version"] = 1
    with pytest.raises(ArtifactError, match="format version 1, which has no chunk checksums.*make cache"):
        LogitStore.open(cache / "logits.zarr")


def test_damaged_chunk_names_rows_and_view(small_cache, tmp_path):
    _, cache = copy_cache(small_cache, tmp_path)
    flip(cache / "logits.zarr" / "logits" / "c" / "0" / "0" / "0")
    store = LogitStore.open(cache / "logits.zarr")
    errors = []
    for view in range(store.v):
        try:
            store.read_rows(0, store.chunk, view)
        except DamagedChunk as error:
            errors.append(error)
    assert len(errors) == 1 and errors[0].rows == (0, min(store.n, store.chunk)) and errors[0].shard == 0


def test_a_second_dump_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(small_cache, tmp_path):
    teacher, _ = small_cache
    out = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        out.mkdir()
        (out / "dump.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid,
                                                   "started": "2026-12-02 00:00:00"}))
        proc = run_cli("cache", "--teacher", str(teacher), "--set", "views=2", "--out", str(out), check=False)
        assert proc.returncode == 2 and f"being dumped by pid {holder.pid}" in proc.stderr
        assert not (out / "logits.zarr").exists()
    finally:
        holder.kill()
        holder.wait()
    # its holder is gone: the lock is stale, and the dump takes it over and finishes
    run_cli("cache", "--teacher", str(teacher), "--set", "views=2", "--out", str(out))
    assert (out / "manifest.json").is_file() and not (out / "dump.lock").exists()
    lock = DumpLock(out).acquire()
    with pytest.raises(ArtifactError, match=f"pid {os.getpid()}"):
        DumpLock(out).acquire()
    lock.release()


def test_four_students_read_one_cache_at_once_while_a_dump_is_tried(small_cache, tmp_path):
    teacher, cache = small_cache
    before = store_hash(cache / "logits.zarr")
    env = {**os.environ, **ALLOC_ENV, "OMP_NUM_THREADS": "1"}
    students = [subprocess.Popen([sys.executable, "-m", "stages.cli", "student", "--cache", str(cache), "--set",
                                  "epochs=2", "--set", "warmup_epochs=1", "--set", f"seed={seed}", "--out",
                                  str(tmp_path / f"s{seed}")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for seed in range(4)]
    dump = run_cli("cache", "--teacher", str(teacher), "--set", "views=3", "--out", str(cache))
    assert "is complete; nothing to do" in dump.stdout
    for proc in students:
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, output
    assert store_hash(cache / "logits.zarr") == before
    tops = [json.loads((tmp_path / f"s{seed}" / "metrics.json").read_text())["top1"] for seed in range(4)]
    assert all(np.isfinite(tops))
