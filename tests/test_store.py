"""The logit store: seeded data written, read back and compared exactly; resume, ranks, refusals, order."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from store import codecs
from store.manifest import ArtifactError
from store.order import chunk_plan, chunked_order, view_for_epoch
from store.reader import LogitStore
from store.schema import FORMAT_VERSION, done_path
from store.writer import StoreWriter

N, V, C, P, CHUNK = 37, 3, 11, 8, 4  # 10 shards, the last one a single row
TEACHER = "a1" * 32
ATTRS = {"recipe": {"name": "fmnist-lt", "epochs": 2}, "view_spec": {"scale": (0.35, 1.0), "flip": True},
         "fingerprints": {"teacher": TEACHER, "samples": "b2" * 32}, "seed": 7}


def make_data(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 5, (N, V, C)).astype(np.float32)
    labels = rng.integers(0, C, N)
    logits[np.arange(N), :, labels] += 8
    return {"logits": logits, "params": rng.random((N, V, P), dtype=np.float32), "labels": labels,
            "ids": rng.permutation(1000)[:N], "class_counts": np.bincount(labels, minlength=C)}


DATA = make_data()


def open_writer(path, codec="float16", attrs=ATTRS, n=N, **kw) -> StoreWriter:
    return StoreWriter.create_or_resume(path, n, V, C, codec, DATA["labels"][:n], DATA["ids"][:n],
                                        DATA["class_counts"], attrs, P, chunk=CHUNK, **kw)


def write(writer: StoreWriter, shards) -> None:
    for shard in shards:
        writer.write_shard(shard.index, DATA["logits"][shard.start:shard.stop],
                           DATA["params"][shard.start:shard.stop])


def dump(path, codec="float16") -> Path:
    with open_writer(path, codec) as writer:
        write(writer, writer.missing_shards())
    writer.mark_complete()
    return Path(path)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return dump(tmp_path_factory.mktemp("ref") / "logits.zarr")


def all_rows():
    return np.repeat(np.arange(N), V), np.tile(np.arange(V), N)


def test_float16_store_reads_back_exactly(reference):
    store = LogitStore.open(reference, expect={"teacher": TEACHER})
    index, views = all_rows()
    logits, params = store.read(index, views)
    expected = DATA["logits"].astype(np.float16).astype(np.float32).reshape(-1, C)
    np.testing.assert_array_equal(logits, expected)
    np.testing.assert_array_equal(params, DATA["params"].reshape(-1, P))
    for name in ("labels", "ids", "class_counts"):
        np.testing.assert_array_equal(getattr(store, name), DATA[name])
    assert (store.n, store.v, store.c, store.p, store.codec) == (N, V, C, P, "float16")


def test_attributes_round_trip(reference):
    attrs = LogitStore.open(reference).attrs
    assert attrs["recipe"] == ATTRS["recipe"] and attrs["fingerprints"] == ATTRS["fingerprints"]
    assert attrs["view_spec"] == {"scale": [0.35, 1.0], "flip": True} and attrs["seed"] == 7
    assert attrs["format_version"] == FORMAT_VERSION and attrs["codec"] == "float16"
    assert attrs["versions"]["zarr"] == zarr.__version__


def test_int8_store_within_derived_bound(tmp_path):
    store = LogitStore.open(dump(tmp_path / "s.zarr", "int8"))
    index, views = all_rows()
    logits, params = store.read(index, views)
    truth = DATA["logits"].reshape(-1, C)
    parts = codecs.encode(truth, "int8")
    np.testing.assert_array_equal(logits, codecs.decode(parts, "int8"))
    bound = (truth.max(1) - truth.min(1)) / 510
    assert (np.abs(logits - truth) <= codecs.int8_error_bound(parts)[:, None]).all()
    np.testing.assert_allclose(codecs.int8_error_bound(parts), bound, rtol=1e-3)  # (max - min) / 510
    np.testing.assert_array_equal(logits.max(1), truth.max(1))  # the top logit decodes exactly
    np.testing.assert_array_equal(params, DATA["params"].reshape(-1, P))


def test_int8_constant_row_is_exact():
    z = np.full((2, 5), 3.25, dtype=np.float32)
    np.testing.assert_array_equal(codecs.decode(codecs.encode(z, "int8"), "int8"), z)


def _killed_dump(path: str) -> None:
    """Run in a subprocess: queue six shards, then die at once, as a killed job would."""
    import os
    writer = open_writer(path, queue_size=1)
    write(writer, writer.missing_shards()[:6])
    os._exit(0)


def test_resume_after_kill_is_bit_identical(tmp_path, reference):
    path = tmp_path / "s.zarr"
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " \
           f"import test_store; test_store._killed_dump({str(path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], timeout=60)
    # Also leave one finished shard half-written, without its marker, as a crash mid-write would.
    done_path(path, 1).unlink()
    shard_file = path / "logits" / "c" / "1" / "0" / "0"
    shard_file.write_bytes(shard_file.read_bytes()[: shard_file.stat().st_size // 2])
    writer = open_writer(path)
    missing = [s.index for s in writer.missing_shards()]
    assert 1 in missing and 9 in missing and not {0, 2, 3} & set(missing)  # 0-3 were done before the kill
    with pytest.raises(ArtifactError, match="not written"):
        writer.mark_complete()
    with pytest.raises(ArtifactError, match="incomplete"):
        LogitStore.open(path)
    write(writer, writer.missing_shards())
    writer.mark_complete()
    assert tree_bytes(path) == tree_bytes(reference)


def test_two_ranks_equal_one_writer(tmp_path, reference):
    path = tmp_path / "s.zarr"
    errors = []

    def rank(r: int) -> None:
        try:
            with open_writer(path) as writer:  # both ranks create_or_resume at once
                shards = writer.missing_shards(r, 2)
                assert all(s.index % 2 == r for s in shards)
                write(writer, shards)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    open_writer(path).mark_complete()
    assert tree_bytes(path) == tree_bytes(reference)
    assert not list(tmp_path.glob(".*.tmp"))  # the losing rank cleaned up its temporary store


def test_open_refuses_other_format_version(tmp_path):
    path = dump(tmp_path / "s.zarr")
    zarr.open_group(str(path), mode="r+").attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1}"):
        LogitStore.open(path)


def test_open_refuses_other_fingerprint_and_missing_store(reference, tmp_path):
    with pytest.raises(ArtifactError, match=r"teacher fingerprint mismatch.*ffffffff.*a1a1a1a1"):
        LogitStore.open(reference, expect={"samples": "b2" * 32, "teacher": "f" * 64})
    with pytest.raises(ArtifactError, match="no logit store"):
        LogitStore.open(tmp_path / "nothing.zarr")


def test_reopen_for_write_refuses_mismatch_and_complete_store(tmp_path, reference):
    path = tmp_path / "s.zarr"
    open_writer(path).close()
    with pytest.raises(ArtifactError, match=f"with n = {N}, this run asks for {N - 1}"):
        open_writer(path, n=N - 1)
    with pytest.raises(ArtifactError, match="with codec = 'float16'"):
        open_writer(path, codec="int8")
    other = {**ATTRS, "fingerprints": {**ATTRS["fingerprints"], "samples": "c3" * 32}}
    with pytest.raises(ArtifactError, match="samples fingerprint"):
        open_writer(path, attrs=other)
    with pytest.raises(ArtifactError, match="'recipe'"):
        open_writer(path, attrs={**ATTRS, "recipe": {"name": "other"}})
    with pytest.raises(ArtifactError, match="other labels"):
        StoreWriter.create_or_resume(path, N, V, C, "float16", DATA["labels"][::-1], DATA["ids"],
                                     DATA["class_counts"], ATTRS, P, chunk=CHUNK)
    with pytest.raises(ArtifactError, match="already a complete"):
        open_writer(reference)


def test_writer_thread_error_is_raised(tmp_path):
    writer = open_writer(tmp_path / "s.zarr")
    bad = np.full((CHUNK, V, C), np.nan, dtype=np.float32)
    writer.write_shard(0, bad, DATA["params"][:CHUNK])
    with pytest.raises(ArtifactError, match="NaN"):
        writer.close()
    with pytest.raises(ValueError, match="needs logits"):
        writer.write_shard(0, DATA["logits"][:2], DATA["params"][:2])


@pytest.mark.parametrize("n,chunk,world", [(37, 4, 1), (37, 4, 3), (1000, 16, 4), (5, 8, 2)])
def test_epoch_order_is_a_sharded_permutation(n, chunk, world):
    shares = [chunked_order(3, n, chunk, 11, r, world, window=2) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == -(-n // world)
    np.testing.assert_array_equal(np.unique(np.concatenate(shares)), np.arange(n))
    full = chunked_order(3, n, chunk, 11, window=2)
    np.testing.assert_array_equal(np.sort(full), np.arange(n))
    np.testing.assert_array_equal(np.concatenate(shares)[:n], full)  # disjoint: rank shares split it
    np.testing.assert_array_equal(full, chunked_order(3, n, chunk, 11, window=2))  # a pure function
    assert not np.array_equal(full, chunked_order(4, n, chunk, 11, window=2))  # another epoch, another order


def test_epoch_order_is_chunk_local():
    order = chunked_order(0, 1000, 10, 5, window=4)
    windows = (order // 10).reshape(-1, 40)  # each window of 40 positions covers exactly 4 chunks
    assert all(len(np.unique(w)) == 4 for w in windows)
    plan = chunk_plan(order, 10, 32, horizon=40)
    assert sorted(np.concatenate([s.load for s in plan]).tolist()) == list(range(100))  # each read once
    assert sorted(np.concatenate([s.evict for s in plan]).tolist()) == list(range(100))


def test_view_for_epoch_cycles_through_all_views():
    for v in (1, 3, 8):
        for cycle in range(3):
            views = [view_for_epoch(e, v, seed=4) for e in range(cycle * v, (cycle + 1) * v)]
            assert sorted(views) == list(range(v))
    assert [view_for_epoch(e, 8, 4) for e in range(16)] != [view_for_epoch(e, 8, 5) for e in range(16)]


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_stream_yields_each_sample_once_with_its_data(reference, batch_size):
    store = LogitStore.open(reference)
    for epoch in range(V):
        batches = list(store.stream(epoch, seed=3, batch_size=batch_size))
        index = np.concatenate([b[0] for b in batches])
        np.testing.assert_array_equal(index, chunked_order(epoch, N, store.chunk, 3))
        views = np.concatenate([b[1] for b in batches])
        assert (views == view_for_epoch(epoch, V, 3)).all()
        logits = np.concatenate([b[2] for b in batches])
        params = np.concatenate([b[3] for b in batches])
        np.testing.assert_array_equal(logits, DATA["logits"][index, views].astype(np.float16))
        np.testing.assert_array_equal(params, DATA["params"][index, views])
        np.testing.assert_array_equal(store.labels[index], DATA["labels"][index])
        assert all(len(b[0]) == batch_size for b in batches[:-1])


def test_stream_by_rank_covers_the_epoch_and_stops_early(reference):
    store = LogitStore.open(reference)
    seen = [np.concatenate([b[0] for b in store.stream(1, 3, 8, rank=r, world=2)]) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 19
    np.testing.assert_array_equal(np.unique(np.concatenate(seen)), np.arange(N))
    stream = store.stream(0, 3, 2)
    next(stream)
    stream.close()  # leaving early must stop the prefetch thread, not hang
    assert not [t for t in threading.enumerate() if t.name.startswith(("store-prefetch", "store-read"))]
