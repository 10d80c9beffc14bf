"""Virtual example distributions: hand-worked values, an independent computation over the raw store, and
the inspect stage's outputs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import zarr

from pipeline.analysis.virtual import flatness, smallest_tau, virtual_counts
from store.reader import LogitStore
from store.writer import StoreWriter


def make_store(path, logits: np.ndarray, labels: np.ndarray, chunk=None) -> LogitStore:
    n, v, c = logits.shape
    counts = np.bincount(labels, minlength=c)
    attrs = {"recipe": {}, "view_spec": {}, "fingerprints": {"samples": "x"}, "view_seed": 1}
    writer = StoreWriter.create_or_resume(path, n, v, c, "float16", labels, np.arange(n), counts, attrs,
                                          chunk=chunk, shard=chunk)
    with writer:
        for shard in writer.missing_shards():
            writer.write_shard(shard.index, logits[shard.start:shard.stop],
                               np.zeros((shard.stop - shard.start, v, 8), np.float32))
    writer.mark_complete()
    return LogitStore.open(path)


def test_virtual_counts_by_hand(tmp_path):
    # images 0 and 1 have z = [ln 4, 0] in both views, image 2 has z = [0, ln 9].
    # tau 1, p 1: t = [0.8, 0.2] twice and [0.1, 0.9], so V = [1.7, 1.3].
    # tau 1, p 0.5: t = softmax([ln 2, 0]) = [2/3, 1/3] twice and softmax([0, ln 3]) = [1/4, 3/4]: V = [19/12, 17/12].
    # tau 2, p 1 divides the logits by 2, which gives the same targets as p 0.5 here.
    z = np.zeros((3, 2, 2), np.float32)
    z[:2, :, 0] = math.log(4)
    z[2, :, 1] = math.log(9)
    store = make_store(tmp_path / "s.zarr", z, np.array([0, 0, 1]))
    got = virtual_counts(store, [(1.0, 1.0), (1.0, 0.5), (2.0, 1.0)])
    assert got[0] == pytest.approx([1.7, 1.3], rel=1e-3)  # float16 storage of ln 4 and ln 9
    assert got[1] == pytest.approx([19 / 12, 17 / 12], rel=1e-3)
    assert got[2] == pytest.approx([19 / 12, 17 / 12], rel=1e-3)


def test_virtual_counts_match_a_direct_computation_over_the_raw_store(tmp_path):
    rng = np.random.default_rng(0)
    n, v, c = 45, 3, 6
    z = (rng.normal(size=(n, v, c)) * 4).astype(np.float32)
    store = make_store(tmp_path / "s.zarr", z, rng.integers(0, c, n), chunk=8)  # several chunks and shards
    raw = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["logits"][:].astype(np.float64)
    for tau, p in ((1.0, 1.0), (3.0, 0.5), (9.0, 1.0)):
        q = np.exp(raw / tau) / np.exp(raw / tau).sum(-1, keepdims=True)
        t = q ** p / (q ** p).sum(-1, keepdims=True)
        expected = t.sum(axis=(0, 1)) / v
        assert virtual_counts(store, [(tau, p)])[0] == pytest.approx(expected, rel=1e-9)


def test_flatness_figures_and_the_tail_to_head_ratio():
    train = np.array([500, 200, 50, 30, 10, 5])  # Many: 500, 200; Medium: 50, 30; Few: 10, 5
    f = flatness(train, train)
    assert f["min_over_max"] == pytest.approx(5 / 500)
    assert f["tail_to_head"] == pytest.approx(7.5 / 350)
    share = train / train.sum()
    assert f["entropy"] == pytest.approx(-(share * np.log(share)).sum() / math.log(6))
    flat = flatness(np.full(6, 10.0), train)
    assert flat["min_over_max"] == 1 and flat["tail_to_head"] == 1 and flat["entropy"] == pytest.approx(1)


def test_smallest_tau_reaches_the_target(tmp_path):
    z = np.zeros((4, 1, 2), np.float32)
    z[..., 0] = 2.0  # min/max of softmax([2, 0] / tau) * 4 is e^(-2/tau): >= 0.5 once tau >= 2 / ln 2
    store = make_store(tmp_path / "s.zarr", z, np.array([0, 0, 0, 1]))
    tau = smallest_tau(store, 1.0, 0.5)
    assert 2 / math.log(2) <= tau <= 2 / math.log(2) * 1.07
    assert smallest_tau(store, 1.0, 1.01) is None


def test_inspect_stage_on_a_real_cache(small_cache, tmp_path):
    from .conftest import run_cli

    _, cache = small_cache
    proc = run_cli("inspect", "--cache", str(cache), "--at", "1,1", "--at", "3,0.5", "--flatness", "0.5",
                   "--out", str(tmp_path))
    assert "min/max" in proc.stdout and "smallest tau" in proc.stdout
    result = json.loads((tmp_path / "inspect.json").read_text())
    assert (tmp_path / "inspect.png").stat().st_size > 1000
    store = LogitStore.open(cache / "logits.zarr")
    raw = np.stack([store.read_rows(0, store.n, view)[0] for view in range(store.v)], axis=1).astype(np.float64)
    for entry in result["settings"]:  # the stage's counts against the definition, from every stored logit
        q = np.exp(raw / entry["tau"] - (raw / entry["tau"]).max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        t = q ** entry["power"] / (q ** entry["power"]).sum(-1, keepdims=True)
        np.testing.assert_allclose(entry["virtual_counts"], t.sum(axis=(0, 1)) / store.v, rtol=1e-4)
