"""The cache stage on real data: fidelity, kill-and-resume equality, two-process equality, refusals."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.data.loaders import TorchExecutor
from pipeline.data.targets import positions_of, row_order
from pipeline.data.sources import load_source
from pipeline.device import autocast
from stages.artifacts import load_teacher
from store.manifest import ArtifactError
from store.reader import LogitStore

from .conftest import kill_after, needs_fmnist, run_cli

pytestmark = needs_fmnist


def assert_same_store(a_path, b_path):
    """Every array of two stores is equal, element for element."""
    a, b = (zarr.open_group(str(p), mode="r") for p in (a_path, b_path))
    for name in ("logits", "params", "labels", "ids", "class_counts"):
        assert np.array_equal(a[name][:], b[name][:]), name


def test_store_holds_what_the_stage_promises(small_cache):
    teacher, cache = small_cache
    store = LogitStore.open(cache / "logits.zarr")
    source = load_source("fmnist-lt")
    assert (store.n, store.v, store.c, store.p) == (1236, 3, 10, 8)
    rows = positions_of(store.ids, source.train.ids)  # rows hold the samples in a seeded shuffled order
    assert sorted(rows) == list(range(store.n)) and not np.array_equal(rows, np.arange(store.n))
    assert np.array_equal(rows, row_order(store.n, store.attrs["view_seed"]))
    assert np.array_equal(store.labels, source.train.labels[rows])
    assert np.array_equal(store.class_counts, source.class_counts)
    assert store.fingerprints["samples"] == source.fingerprint()
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["stage"] == "cache" and manifest["inputs"]["teacher"] == store.fingerprints["teacher"]
    assert store.attrs["view_spec"]["kind"] == "pad_crop" and store.attrs["recipe"]["cache"]["views"] == 3
    # the cache's folder config is its identity: teacher and cache settings, no runtime keys
    config = json.loads((cache / "config.json").read_text())
    assert config["cache"]["views"] == 3 and "batch_size" not in config["cache"] and "runtime" not in config
    assert manifest["config"]["runtime"]["batch_size"] == 128 and manifest["config"]["runtime"]["world"] == 1


def test_fidelity_replayed_views_give_the_stored_logits(small_cache):
    """Replay stored views of random (image, view) pairs, run the teacher, compare: float16 rounding only."""
    teacher_dir, cache = small_cache
    store = LogitStore.open(cache / "logits.zarr")
    source = load_source("fmnist-lt")
    rng = np.random.default_rng(0)
    rows, views = rng.choice(store.n, 64, replace=False), rng.integers(0, store.v, 64)
    logits, params = store.read(rows, views)
    index = positions_of(store.ids[rows], source.train.ids)
    config = {**store.attrs["recipe"]["teacher"], **store.attrs["recipe"]["cache"]}
    executor = TorchExecutor(source.train.images, config["crop_size"], source.mean, source.std)
    model = load_teacher(teacher_dir, torch.device("cpu"), config["channels_last"])
    images = executor.run(index, params)
    if config["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(torch.device("cpu"), config["bf16"]):
        fresh = model(images)["logits"].float().numpy()
    # float16 keeps 11 significant bits: a relative error of at most 2^-11 per stored logit
    assert np.all(np.abs(fresh - logits) <= np.abs(fresh) * 2.0 ** -11 + 1e-6), np.abs(fresh - logits).max()
    assert np.array_equal(logits, fresh.astype(np.float16).astype(np.float32))


def test_killed_dump_resumes_to_an_identical_store(small_cache, tmp_path):
    teacher, cache = small_cache
    killed = tmp_path / "killed"
    args = ["cache", "--teacher", str(teacher), "--set", "views=3", "--out", str(killed)]
    kill_after(args, lambda: any((killed / "logits.zarr" / "done").glob("*")))
    assert not (killed / "manifest.json").exists(), "the dump finished before it could be killed"
    with pytest.raises(ArtifactError, match="incomplete"):
        LogitStore.open(killed / "logits.zarr")
    proc = run_cli(*args)
    assert "resuming" in proc.stdout
    assert_same_store(cache / "logits.zarr", killed / "logits.zarr")


def test_two_process_dump_equals_single_process_dump(small_cache, tmp_path):
    teacher, cache = small_cache
    out = tmp_path / "ddp"
    run_cli("cache", "--teacher", str(teacher), "--set", "views=3", "--out", str(out), nproc=2,
            env={"OMP_NUM_THREADS": "1"})
    assert_same_store(cache / "logits.zarr", out / "logits.zarr")


def test_cache_refuses_a_teacher_of_another_split(small_cache, tmp_path):
    teacher, _ = small_cache
    other = tmp_path / "teacher"
    shutil.copytree(teacher, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["inputs"]["train_samples"] = "0" * 64  # as if trained on another split
    (other / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("cache", "--teacher", str(other), "--set", "views=2", "--out", str(tmp_path / "c"), check=False)
    assert proc.returncode == 2
    assert "dataset sample list fingerprint mismatch" in proc.stderr and "000000" in proc.stderr
    assert not (tmp_path / "c" / "logits.zarr").exists()


def test_cache_refuses_an_incomplete_teacher(tmp_path):
    (tmp_path / "t").mkdir()
    proc = run_cli("cache", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "c"), check=False)
    assert proc.returncode == 2 and "manifest.json is missing" in proc.stderr and "make teacher" in proc.stderr
