"""The teacher stage end to end on real Fashion-MNIST-LT, at a few epochs: resume, torchrun, errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from store.order import random_order
from pipeline.train.loop import load_checkpoint

from .conftest import ALLOC_ENV, REPO, needs_fmnist, run_cli

SHORT = ["--set", "epochs=3", "--set", "warmup_epochs=1", "--set", "milestones=2"]


def test_shards_are_disjoint_equal_and_cover_the_epoch():
    order = random_order(5, 1001, 3)
    assert np.array_equal(order, random_order(5, 1001, 3))
    assert not np.array_equal(order, random_order(6, 1001, 3))  # another epoch, another order
    assert sorted(order) == list(range(1001))
    parts = [random_order(5, 1001, 3, r, 2) for r in range(2)]
    assert np.array_equal(parts[0], order[0::2]) and np.array_equal(parts[1][:500], order[1::2])
    assert len(parts[0]) == len(parts[1]) == 501
    assert set(parts[0]) | set(parts[1]) == set(range(1001))
    assert len(set(parts[0]) & set(parts[1])) == 1  # the one sample wrapped to even the shards


def _weights(path):
    return load_checkpoint(path)["model"]


@needs_fmnist
def test_killed_teacher_resumes_to_the_same_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_cli("teacher", *SHORT, "--out", str(full))
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "teacher", *SHORT, "--out", str(killed)],
                            cwd=REPO, env={**os.environ, **ALLOC_ENV}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"
    assert load_checkpoint(killed / "checkpoint.pt")["epoch"] < 3
    resumed = run_cli("teacher", *SHORT, "--out", str(killed))
    assert "resuming from" in resumed.stdout
    a, b = _weights(full / "model.pt"), _weights(killed / "model.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    assert ma["top1"] == mb["top1"] and ma["per_class"] == mb["per_class"]
    # a complete run is not redone, and a different config is refused rather than overwritten
    again = run_cli("teacher", *SHORT, "--out", str(full))
    assert "complete" in again.stdout
    other = run_cli("teacher", *SHORT, "--set", "lr=0.05", "--out", str(full), check=False)
    assert other.returncode == 2 and "other settings" in other.stderr and "lr" in other.stderr
    # runtime settings are not identity: another decode-thread count or bf16 finds the same run complete
    same = run_cli("teacher", *SHORT, "--set", "workers=1", "--set", "bf16=false", "--out", str(full))
    assert "complete" in same.stdout


@needs_fmnist
def test_teacher_outputs_metrics_manifest_and_safe_checkpoints(tmp_path):
    out = tmp_path / "t"
    proc = run_cli("teacher", "--set", "epochs=1", "--out", str(out))
    for line in ("top-1", "Many", "Medium", "Few"):
        assert line in proc.stdout
    assert "img/s" in proc.stdout and "ETA" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "teacher" and manifest["config"]["teacher"]["epochs"] == 1
    assert set(manifest["inputs"]) == {"train_samples", "test_samples"}
    assert "torch" in manifest["versions"]
    cpuinfo = Path("/proc/cpuinfo").read_text()  # the CPU is recorded: other CPUs train the seed to other numbers
    expected = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    assert manifest["machine"]["cpu"] == expected and manifest["machine"]["cores"] == os.cpu_count()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_class"]) == 10 and metrics["class_counts"][0] == 500
    # checkpoints hold plain data only: loading with weights_only=True works
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    evals = np.load(out / "eval.npz")
    assert evals["logits"].shape == (10000, 10) and evals["features"].shape == (10000, 64)


@needs_fmnist
def test_teacher_trains_under_torchrun_with_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    run_cli("teacher", "--set", "epochs=2", "--set", "warmup_epochs=1", "--out", str(out), nproc=2,
            env={"OMP_NUM_THREADS": "1"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["runtime"]["world"] == 2
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert history[1]["loss"] < history[0]["loss"]


def test_unknown_dataset_lists_the_known_ones():
    proc = run_cli("teacher", "--dataset", "mnist-lt", check=False)
    assert proc.returncode == 2
    assert "fmnist-lt" in proc.stderr and "inat2018" in proc.stderr


def test_missing_data_root_says_how_to_get_the_data(tmp_path):
    proc = run_cli("teacher", "--data-root", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "apt-get install dataset-fashion-mnist" in proc.stderr
    proc = run_cli("teacher", "--dataset", "inat2018", "--data-root", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode == 2 and "nowhere" in proc.stderr
