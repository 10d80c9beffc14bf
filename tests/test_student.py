"""The student stage on a real cache: cached vs online equality, schedule, refusals, resume, torchrun."""
from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from pipeline.data import TorchExecutor
from pipeline.distill import CachedTargets, OnlineTargets
from pipeline.losses import DiVELoss
from pipeline.models import build_model
from pipeline.sources import load_source
from pipeline.train import load_checkpoint
from pipeline.config import recipe_from_dict
from stages.cache import load_teacher
from store.order import view_for_epoch
from store.reader import LogitStore

from .conftest import kill_after, needs_fmnist, run_cli

pytestmark = needs_fmnist
SHORT = ["--set", "epochs=2", "--set", "warmup_epochs=1"]


def _loaders(teacher_dir, cache):
    store = LogitStore.open(cache / "logits.zarr")
    recipe = recipe_from_dict(store.attrs["recipe"])
    source = load_source("fmnist-lt")
    executor = TorchExecutor(source.train.images, recipe.crop_size, source.mean, source.std)
    teacher = load_teacher(teacher_dir, torch.device("cpu"), recipe.channels_last)
    cached = CachedTargets(store, source.train.ids, executor, 128, seed=0)
    online = OnlineTargets.like(store, source.train, teacher, recipe.view_spec(), executor, 128, 0, torch.device("cpu"),
                                recipe.bf16, recipe.channels_last)
    return store, source, cached, online


def test_cached_and_online_give_the_same_batch_loss_and_gradients(small_cache):
    store, source, cached, online = _loaders(*small_cache)
    loss = DiVELoss(torch.as_tensor(source.class_counts), tau=3.0, power=0.5, alpha=0.5)
    for epoch in (0, 2):
        a, b = next(iter(cached.batches(epoch))), next(iter(online.batches(epoch)))
        assert np.array_equal(a.index, b.index)
        assert np.array_equal(a.params, b.params)  # stored views are exactly the recomputed ones
        assert torch.equal(a.images, b.images)
        assert torch.allclose(a.teacher_logits, b.teacher_logits, rtol=2.0 ** -11, atol=1e-6)
        grads = []
        for batch in (a, b):
            torch.manual_seed(0)
            model = build_model("resnet32", 10, 1)
            parts = loss(model(batch.images), batch.labels, batch.teacher_logits)
            parts["loss"].backward()
            grads.append((parts, [p.grad.clone() for p in model.parameters()]))
        (pa, ga), (pb, gb) = grads
        assert torch.allclose(pa["loss"], pb["loss"], rtol=1e-3)
        assert torch.allclose(pa["bsce"], pb["bsce"])  # the label term does not see the teacher at all
        for x, y in zip(ga, gb):
            assert torch.allclose(x, y, rtol=1e-2, atol=1e-5)


def test_every_epoch_visits_each_sample_once_with_a_fresh_view(small_cache):
    store, _, cached, _ = _loaders(*small_cache)
    seen_views = []
    for epoch in range(store.v):
        index = np.concatenate([b.index for b in cached.batches(epoch)])
        assert sorted(index) == list(range(store.n))
        seen_views.append(view_for_epoch(epoch, store.v, 0))
    assert sorted(seen_views) == list(range(store.v))


def test_student_trains_from_cache_resumes_and_refuses_another_split(small_cache, tmp_path):
    teacher, cache = small_cache
    full, killed = tmp_path / "a" / "full", tmp_path / "b" / "killed"  # apart, so neither is the other's twin
    proc = run_cli("student", "--cache", str(cache), *SHORT, "--out", str(full))
    assert "student (cached)" in proc.stdout and "teacher" in proc.stdout  # the two tables side by side
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["stage"] == "student" and manifest["config"]["tau"] == 3.0
    assert manifest["config"]["cache_fingerprints"] == LogitStore.open(cache / "logits.zarr").fingerprints
    kill_after(["student", "--cache", str(cache), *SHORT, "--out", str(killed)],
               lambda: (killed / "checkpoint.pt").exists())
    assert not (killed / "manifest.json").exists()
    run_cli("student", "--cache", str(cache), *SHORT, "--out", str(killed))
    a, b = load_checkpoint(full / "model.pt")["model"], load_checkpoint(killed / "model.pt")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the same config under another name beside a finished run is that run: copied, not trained again
    twin = tmp_path / "a" / "twin"
    proc = run_cli("student", "--cache", str(cache), *SHORT, "--out", str(twin))
    assert "copying its results" in proc.stdout and "epoch 1/2" not in proc.stdout
    assert (twin / "model.pt").read_bytes() == (full / "model.pt").read_bytes()
    assert json.loads((twin / "manifest.json").read_text())["metrics"] == manifest["metrics"]
    from stages.report import collect, summarize
    dive = [e for e in summarize(collect(tmp_path / "a")) if e["method"] == "DiVE"]
    assert len(dive) == 1 and dive[0]["seeds"] == [0]  # one run per seed in the report
    # a cache whose store says it was made from another split is refused, naming the fingerprint
    other = tmp_path / "cache"
    shutil.copytree(cache, other)
    meta = json.loads((other / "logits.zarr" / "zarr.json").read_text())
    meta["attributes"]["fingerprints"]["samples"] = "f" * 64
    (other / "logits.zarr" / "zarr.json").write_text(json.dumps(meta))
    proc = run_cli("student", "--cache", str(other), *SHORT, "--out", str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and "samples fingerprint mismatch" in proc.stderr


def test_student_runs_under_torchrun_with_two_gloo_processes(small_cache, tmp_path):
    _, cache = small_cache
    out = tmp_path / "ddp"
    run_cli("student", "--cache", str(cache), "--set", "epochs=1", "--out", str(out), nproc=2,
            env={"OMP_NUM_THREADS": "1"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["world"] == 2 and np.isfinite(manifest["metrics"]["top1"])
