"""Codec topk (K logits and a tail summary per view), the size planner, and every codec through every reader."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.analysis.virtual import count_error_bounds, soft_targets_np, virtual_counts
from store import codecs, topk
from store.plan import plan_store
from store.reader import LogitStore
from store.schema import Layout

from .conftest import run_cli


def test_topk_is_exact_on_its_k_entries():
    z = np.random.default_rng(3).normal(0, 4, (50, 2, 40)).astype(np.float32)
    record = codecs.encode(z, "topk", k=7)["logits"]
    assert record.shape == (50, 2, 2 * 7 + 10) and record.dtype == np.uint16
    top, index, _ = topk.split(record, 7)
    truth = np.argsort(-z, axis=-1)[..., :7]
    np.testing.assert_array_equal(index, truth)  # the K largest, in descending order
    for sharpness in (1 / 9, 1.0):
        dense = codecs.decode({"logits": record}, "topk", c=40, k=7, sharpness=sharpness)
        np.testing.assert_array_equal(np.take_along_axis(dense, truth, -1),
                                      np.take_along_axis(z, truth, -1).astype(np.float16).astype(np.float32))
        tail = np.ones(z.shape, bool)
        np.put_along_axis(tail, truth, False, axis=-1)
        # every tail class gets one value, and it is below the K-th logit
        spread = np.where(tail, dense, np.nan)
        assert np.allclose(np.nanmax(spread, -1), np.nanmin(spread, -1))
        assert (np.nanmax(spread, -1) <= top[..., -1]).all()


@pytest.mark.parametrize("tau, top_share, tail_share", [
    # z = (5, 2, 0, 0), K = 1. tau 1: the tail's mass is e^2 + 2 = 9.38906 against e^5 = 148.41316, so
    # t_top = 148.41316 / 157.80222 = 0.940501 and each tail class gets 9.38906 / 3 / 157.80222 = 0.019833.
    (1.0, 0.940501, 0.019833),
    # tau 9: the tail's mass is e^(2/9) + 2 = 3.248849 against e^(5/9) = 1.742909: t_top = 0.349157, each
    # tail class 3.248849 / 3 / 4.991758 = 0.216948 (beta = 1/9 lies between the stored 1/16 and 1/8).
    (9.0, 0.349157, 0.216948),
])
def test_tail_mass_is_rebuilt_at_tau_1_and_9(tau, top_share, tail_share):
    record = topk.encode(np.array([[5.0, 2.0, 0.0, 0.0]]), 1)
    targets = soft_targets_np(topk.decode(record, 1, 4, 1 / tau), tau, 1.0)[0]
    np.testing.assert_allclose(targets, [top_share, tail_share, tail_share, tail_share], rtol=1e-3)


def test_k_at_or_above_c_is_refused_naming_the_limit(tmp_path):
    with pytest.raises(ValueError, match="below C = 10"):
        Layout.choose(100, 2, 10, 8, "topk", k=10)
    with pytest.raises(ValueError, match="applies to codec=topk or sampled only"):
        Layout.choose(100, 2, 10, 8, "float16", k=3)
    proc = run_cli("cache", "--plan", "--dataset", "glyph-lt", "--set", "codec=topk", "--set", "topk=300",
                   check=False)
    assert proc.returncode == 2 and "K must be at least 1 and below C = 300" in proc.stderr


def test_every_codec_is_read_by_the_student_inspect_and_verify_and_its_size_was_planned(small_cache, tmp_path):
    teacher, _ = small_cache
    short = ["--set", "epochs=2", "--set", "warmup_epochs=1"]
    exact = {}
    for codec in codecs.CODECS:
        cache = tmp_path / codec
        run_cli("cache", "--teacher", str(teacher), "--set", "views=3", "--set", f"codec={codec}",
                "--set", "topk=4", "--out", str(cache))
        store = LogitStore.open(cache / "logits.zarr", sharpness=0.5 / 3)
        assert store.codec == codec and store.k == (4 if codec in codecs.SPARSE else 0)
        # the planner, from sizes alone, gives the bytes of every chunk file the dump wrote
        plan = plan_store(store.n, store.v, store.c, codec, store.k)
        assert plan.layout == store.layout
        written = sum(f.stat().st_size for f in (cache / "logits.zarr").rglob("*")
                      if f.is_file() and not f.name.endswith(".json"))
        assert written == plan.chunk_bytes
        counts = virtual_counts(store, [(3.0, 0.5)])[0]
        bound = count_error_bounds(store, [(3.0, 0.5)])[0]
        exact[codec] = counts, bound
        assert np.isclose(counts.sum(), store.n)  # each view's targets sum to one
        run_cli("student", "--cache", str(cache), *short, "--out", str(tmp_path / f"student-{codec}"))
        metrics = json.loads((tmp_path / f"student-{codec}" / "metrics.json").read_text())
        assert 0 <= metrics["top1"] <= 100
        proc = run_cli("inspect", "--cache", str(cache), "--at", "3,0.5", "--out", str(tmp_path / f"in-{codec}"))
        assert f"codec {codecs.name(codec, store.k)} at tau 3, p 0.5" in proc.stdout
        proc = run_cli("verify", "--cache", str(cache), "--replay", "16")
        assert proc.stdout.strip().endswith("PASS") and "16 replayed pairs match" in proc.stdout
    # the stated bounds hold against the float16 cache, whose own bound is far smaller
    reference, reference_bound = exact["float16"]
    for codec in ("int8", "topk"):
        counts, bound = exact[codec]
        assert (np.abs(counts - reference) <= bound + reference_bound + 1e-9).all(), codec
        assert bound.max() > reference_bound.max()
    # sampled's is two standard errors, not a hard bound: most classes within it, every one within twice it
    counts, bound = exact["sampled"]
    error = np.abs(counts - reference) - reference_bound
    assert (error <= bound).mean() >= 0.9 and (error <= 2 * bound + 1e-9).all(), (error / bound).max()
