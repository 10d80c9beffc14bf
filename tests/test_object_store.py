"""Caches in S3-compatible object storage, against a real S3 server on loopback (SeaweedFS), not a mock:
a dump into the bucket killed and resumed equals a local dump byte for byte, students stream from it, and the
refusals and checksum errors hold there too."""
from __future__ import annotations

import json

import numpy as np
import pytest

from store.location import RemotePath
from store.manifest import ArtifactError
from store.reader import DamagedChunk, LogitStore
from store.verify import check_store

from .conftest import kill_after, needs_fmnist, run_cli

pytestmark = needs_fmnist


def local_files(store) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}


def bucket_files(url: str, fs) -> dict[str, bytes]:
    prefix = url.split("://", 1)[1]
    return {key[len(prefix) + 1:]: fs.cat_file(key) for key in fs.find(prefix)}


def test_a_dump_into_the_bucket_killed_and_resumed_equals_a_local_dump(small_cache, tmp_path, s3_server):
    teacher, cache = small_cache
    out = tmp_path / "remote-cache"
    args = ["cache", "--teacher", str(teacher), "--set", "views=3", "--out", str(out), "--store-url",
            s3_server["url"]]
    store_url = f"{s3_server['url']}/{out.parent.name}/{out.name}/logits.zarr"
    done = RemotePath(store_url) / "done"
    kill_after(args, lambda: any(True for _ in done.iterdir()))
    assert not (out / "manifest.json").exists(), "the dump finished before it could be killed"
    with pytest.raises(ArtifactError, match="incomplete"):
        LogitStore.open(store_url)
    proc = run_cli(*args, env=s3_server["env"])
    assert "resuming" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["store"] == store_url
    remote = bucket_files(store_url, s3_server["fs"])
    local = local_files(cache / "logits.zarr")
    assert set(remote) == set(local)
    assert all(remote[name] == local[name] for name in local)
    # students stream from the bucket; verify checks it there
    run_cli("student", "--cache", str(out), "--set", "epochs=1", "--set", "warmup_epochs=0", "--out",
            str(tmp_path / "student"), env=s3_server["env"])
    assert 0 <= json.loads((tmp_path / "student" / "metrics.json").read_text())["top1"] <= 100
    assert run_cli("verify", "--cache", str(out), env=s3_server["env"]).stdout.strip().endswith("PASS")


def test_refusals_and_checksum_errors_hold_in_the_bucket(small_cache, tmp_path, s3_server):
    teacher, _ = small_cache
    out = tmp_path / "remote-cache-2"
    run_cli("cache", "--teacher", str(teacher), "--set", "views=2", "--out", str(out), "--store-url",
            s3_server["url"], env=s3_server["env"])
    store_url = json.loads((out / "manifest.json").read_text())["store"]
    with pytest.raises(ArtifactError, match="samples fingerprint mismatch"):
        LogitStore.open(store_url, expect={"samples": "f" * 64})
    # as if another machine were dumping it: incomplete, its lock held there. A dump from here is refused.
    lock = RemotePath(store_url).parent / "dump.lock"
    lock.write_text(json.dumps({"host": "another-machine", "pid": 1, "started": "2026-12-02 00:00:00"}))
    (RemotePath(store_url) / "COMPLETE.json").unlink()
    (out / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        LogitStore.open(store_url)
    proc = run_cli("cache", "--teacher", str(teacher), "--set", "views=2", "--out", str(out), "--store-url",
                   s3_server["url"], check=False, env=s3_server["env"])
    assert proc.returncode == 2 and "being dumped by pid 1 on another-machine" in proc.stderr
    lock.unlink()
    run_cli("cache", "--teacher", str(teacher), "--set", "views=2", "--out", str(out), "--store-url",
            s3_server["url"], env=s3_server["env"])
    # a flipped byte in an object of the bucket is caught by the reader and by verify, and repaired
    chunk = RemotePath(store_url) / "logits" / "c" / "0" / "0" / "0"
    before = chunk.read_bytes()
    data = bytearray(before)
    data[100] ^= 0x10
    chunk.write_bytes(bytes(data))
    store = LogitStore.open(store_url)
    with pytest.raises(DamagedChunk, match="a damaged chunk of 'logits'"):
        for view in range(store.v):
            store.read_rows(0, store.chunk, view)
    failures, _, _ = check_store(RemotePath(store_url))
    assert sum("damaged chunk" in f for f in failures) == 1
    run_cli("cache", "--teacher", str(teacher), "--set", "views=2", "--out", str(out), "--store-url",
            s3_server["url"], "--repair", env=s3_server["env"])
    assert chunk.read_bytes() == before
    assert np.isfinite(LogitStore.open(store_url).read_rows(0, 4, 0)[0]).all()
