"""The student stage on a real cache: cached vs online equality, schedule, refusals, resume, torchrun."""
from __future__ import annotations

import json
import shutil
from itertools import zip_longest

import numpy as np
import torch

from pipeline.data.loaders import TorchExecutor
from pipeline.data.sources import load_source
from pipeline.data.targets import CachedTargets, OnlineTargets, positions_of
from pipeline.data.views import apply_view, normalize, view_params
from pipeline.device import autocast
from pipeline.models import build_model
from pipeline.settings import from_dict
from pipeline.train.loop import load_checkpoint
from pipeline.train.losses import DiVELoss
from stages.artifacts import load_teacher
from store.order import view_for_epoch
from store.reader import LogitStore

from .conftest import kill_after, needs_fmnist, run_cli

pytestmark = needs_fmnist
SHORT = ["--set", "epochs=2", "--set", "warmup_epochs=1"]


def _loaders(teacher_dir, cache):
    store = LogitStore.open(cache / "logits.zarr")
    settings = from_dict("teacher", store.attrs["recipe"]["teacher"])
    source = load_source("fmnist-lt")
    executor = TorchExecutor(source.train.images, settings.crop_size, source.mean, source.std)
    teacher = load_teacher(teacher_dir, torch.device("cpu"), settings.channels_last)
    cached = CachedTargets(store, source.train.ids, executor, 128, seed=0)
    online = OnlineTargets.like(store, source.train, teacher, settings.view_spec(), executor, 128, 0,
                                torch.device("cpu"), settings.bf16, settings.channels_last)
    return store, source, cached, online, settings, teacher


def test_cached_replay_equals_an_independent_recomputation_over_whole_epochs(small_cache):
    """Every batch of whole epochs (V = 3, so epochs 3 and 5 reuse views in a second cycle): the cached
    loader's views, images, labels and teacher logits against the same things recomputed from scratch: view
    parameters from (view seed, sample, view), images with the one-image reference executor, logits with
    the teacher run on those images; and the online reference gives the same batches."""
    store, source, cached, online, settings, teacher = _loaders(*small_cache)
    spec, view_seed = settings.view_spec(), int(store.attrs["view_seed"])
    rows_of_sample = np.empty(store.n, dtype=np.int64)
    rows_of_sample[positions_of(store.ids, source.train.ids)] = np.arange(store.n)
    height, width = source.train.images.shape[1:3]  # fmnist-lt keeps its images padded to 32 x 32
    for epoch in (0, 1, 2, 3, 5):
        view = view_for_epoch(epoch, store.v, 0)
        seen = []
        for a, b in zip_longest(cached.batches(epoch), online.batches(epoch)):
            assert a is not None and b is not None, "the cached and online epochs differ in length"
            n = len(a.index)
            params = view_params(spec, view_seed, a.index, view, np.full(n, height), np.full(n, width))
            assert np.array_equal(a.params, params) and np.array_equal(b.params, params)
            images = torch.stack([normalize(apply_view(torch.from_numpy(source.train.images[i]), p, spec.size),
                                            source.mean, source.std) for i, p in zip(a.index, params)])
            assert torch.equal(a.images, images) and torch.equal(b.images, images)
            assert torch.equal(a.labels, torch.from_numpy(source.train.labels[a.index]))
            assert np.array_equal(a.index, b.index)
            with torch.no_grad(), autocast(torch.device("cpu"), settings.bf16):
                fresh = teacher(images.contiguous(memory_format=torch.channels_last))["logits"].float()
            stored, _ = store.read(rows_of_sample[a.index], np.full(n, view))
            assert torch.equal(a.teacher_logits, torch.from_numpy(stored))
            tol = fresh.abs() * 2.0 ** -11 + 1e-6  # float16 storage: 11 significant bits
            assert torch.all((a.teacher_logits - fresh).abs() <= tol)
            assert torch.all((b.teacher_logits - fresh).abs() <= 1e-5)
            seen.append(a.index)
        assert sorted(np.concatenate(seen)) == list(range(store.n))  # each sample once per epoch


def test_cached_and_online_give_the_same_batch_loss_and_gradients(small_cache):
    store, source, cached, online, _, _ = _loaders(*small_cache)
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
    store, _, cached, *_ = _loaders(*small_cache)
    seen_views = []
    for epoch in range(store.v):
        index = np.concatenate([b.index for b in cached.batches(epoch)])
        assert sorted(index) == list(range(store.n))
        seen_views.append(view_for_epoch(epoch, store.v, 0))
    assert sorted(seen_views) == list(range(store.v))


def test_student_trains_from_cache_resumes_and_refuses_another_split(small_cache, tmp_path):
    teacher, cache = small_cache
    full, killed = tmp_path / "a" / "full", tmp_path / "a" / "killed"
    proc = run_cli("student", "--cache", str(cache), *SHORT, "--out", str(full))
    assert "student (cached)" in proc.stdout and "teacher" in proc.stdout  # the two tables side by side
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["stage"] == "student" and manifest["config"]["student"]["tau"] == 3.0
    # the student's own settings: the dataset's batch and epochs given, never the teacher's or the cache's
    assert manifest["config"]["student"]["batch_size"] == 128 and manifest["config"]["student"]["epochs"] == 2
    assert manifest["config"]["cache_fingerprints"] == LogitStore.open(cache / "logits.zarr").fingerprints
    kill_after(["student", "--cache", str(cache), *SHORT, "--out", str(killed)],
               lambda: (killed / "checkpoint.pt").exists())
    assert not (killed / "manifest.json").exists()
    run_cli("student", "--cache", str(cache), *SHORT, "--out", str(killed))
    a, b = load_checkpoint(full / "model.pt")["model"], load_checkpoint(killed / "model.pt")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # two folders of one config and seed are two rows of the report, neither merged away nor averaged
    from stages.artifacts import collect_runs
    from stages.report import summarize
    dive = [e for e in summarize(collect_runs(tmp_path / "a")) if e["method"] == "DiVE"]
    assert sorted(p for e in dive for p in e["paths"]) == [str(full), str(killed)]
    assert [e["seeds"] for e in dive] == [[0], [0]]
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
    assert manifest["config"]["runtime"]["world"] == 2 and np.isfinite(manifest["metrics"]["top1"])
