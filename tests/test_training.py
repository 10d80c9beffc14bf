"""Recipes on the devices a user has: micro batches that accumulate to the global batch, the memory probe and
its message, the linear scaling rule, the gradual warm-up, and a diverging run stopped at its own stage."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.data.loaders import Batch
from pipeline.settings import defaults_for, lr_reason, student_settings, teacher_settings
from pipeline.train.errors import MemoryPlanError
from pipeline.train.loop import lr_at
from pipeline.train.memory import plan_micro_batch, synthetic_batch_maker
from pipeline.train.micro import accumulate_step, micro_slices

from .conftest import needs_fmnist, run_cli


def test_a_batch_given_without_lr_scales_the_lr_linearly():
    im = defaults_for("imagenet-lt").teacher
    assert (im.batch_size, im.lr) == (512, 0.2)
    t = teacher_settings("imagenet-lt", ["batch_size=32"])
    assert t.lr == pytest.approx(0.2 * 32 / 512)
    assert "scaled linearly to batch 32" in lr_reason(t, im) and "0.2 at batch 512" in lr_reason(t, im)
    given = teacher_settings("imagenet-lt", ["batch_size=32", "lr=0.05"])
    assert given.lr == 0.05 and lr_reason(given, im).startswith("lr 0.05: given")
    s = student_settings("fmnist-lt", ["batch_size=256"])  # the student's own recipe pair: 128 and 0.1
    assert s.lr == pytest.approx(0.2)
    assert teacher_settings("fmnist-lt").lr == 0.1 and "the recipe's for batch 128" in \
        lr_reason(teacher_settings("fmnist-lt"), defaults_for("fmnist-lt").teacher)


def test_warm_up_by_epoch_and_by_step():
    cifar = teacher_settings("fmnist-lt")  # LDAM's: lr (e + 1) / 5 for the first five epochs, per epoch
    assert (cifar.warmup, cifar.warmup_epochs) == ("epoch", 5)
    assert [lr_at(cifar, e, 3, 10) for e in range(5)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    im = teacher_settings("imagenet-lt")  # Goyal et al.: rising every step over the first 5 epochs
    assert (im.warmup, im.warmup_epochs) == ("step", 5)
    steps = 10
    assert lr_at(im, 0, 0, steps) == pytest.approx(0.2 / 50)
    assert lr_at(im, 2, 4, steps) == pytest.approx(0.2 * 25 / 50)
    assert lr_at(im, 4, 9, steps) == pytest.approx(0.2)
    assert lr_at(im, 5, 0, steps) == pytest.approx(0.5 * 0.2 * (1 + math.cos(math.pi * 5 / 90)))
    rates = [lr_at(im, e, k, steps) for e in range(5) for k in range(steps)]
    assert all(b > a for a, b in zip(rates, rates[1:]))  # gradual: every step higher than the one before


def test_micro_slices_cover_the_batch():
    assert micro_slices(12, 0) == [slice(0, 12)] and micro_slices(12, 12) == [slice(0, 12)]
    assert micro_slices(12, 5) == [slice(0, 5), slice(5, 10), slice(10, 12)]


def _batch(n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g), np.arange(n),
                 np.zeros((n, 8), np.float32))


class NoBatchNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 6, 3), torch.nn.Linear(6, 4)

    def forward(self, x):
        return {"logits": self.fc(torch.relu(self.conv(x)).mean((2, 3)))}


def _loss(outputs, batch):
    return {"loss": torch.nn.functional.cross_entropy(outputs["logits"], batch.labels)}


@pytest.mark.parametrize("micro", [4, 5, 1])
def test_an_accumulated_step_equals_the_full_batch_step_without_batchnorm(micro):
    results = []
    for m in (0, micro):
        torch.manual_seed(0)
        model = NoBatchNorm().double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
        for step in range(3):  # momentum and weight decay see the accumulated gradient as one
            batch = _batch(12, step)
            batch.images = batch.images.double()
            parts = accumulate_step(model, _loss, batch, optimizer, torch.device("cpu"), False, False, m)
        results.append(([p.detach().clone() for p in model.parameters()], parts["loss"]))
    (full, loss_full), (acc, loss_acc) = results
    for a, b in zip(full, acc):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_full, loss_acc, rtol=1e-6, atol=0)  # the batch's mean loss (logged in float32)


def test_batchnorm_running_statistics_update_once_per_micro_batch():
    """What accumulation changes for BatchNorm: each micro batch is normalized with its own statistics, and
    the running mean moves once per micro batch (here 3 updates of momentum 0.1 instead of 1)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    model = torch.nn.Sequential(bn)
    wrapped = lambda x: {"logits": model(x).mean((2, 3)).repeat(1, 2)[:, :4]}  # noqa: E731
    batch = _batch(12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulate_step(wrapped, _loss, batch, optimizer, torch.device("cpu"), False, False, 4)
    expected = torch.zeros(3)
    for part in batch.images.split(4):
        expected = 0.9 * expected + 0.1 * part.mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected)
    assert bn.num_batches_tracked.item() == 3


def _probe(budget_gib, asked, monkeypatch):
    from pipeline.models import build_model
    from pipeline.train.losses import BalancedSoftmax

    if budget_gib is not None:
        monkeypatch.setenv("DIVE_MEMORY_BUDGET_GIB", str(budget_gib))
    model = build_model("resnet32", 10, 1)
    loss = BalancedSoftmax(torch.tensor([50, 30, 20, 10, 8, 6, 5, 4, 3, 2]))
    make = synthetic_batch_maker(Batch, 1, 32, 10, teacher_logits=False)
    before = [p.clone() for p in model.parameters()], torch.get_rng_state()
    chosen = plan_micro_batch(model, lambda o, b: loss(o, b.labels), make, 128, asked, torch.device("cpu"), True,
                              False, "batch 128 of resnet32 at 32 px", "the hint", log=lambda *a: None)
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))  # probes ran on a copy
    assert torch.equal(before[1], torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    return chosen


def test_auto_micro_batch_is_the_largest_divisor_that_fits(monkeypatch):
    assert _probe(None, 0, monkeypatch) == 128  # this machine has room for the whole batch
    small = _probe(0.1, 0, monkeypatch)  # 100 MiB: the step of 128 (about 0.4 GiB) does not fit
    assert small < 128 and 128 % small == 0
    assert _probe(0.1, small, monkeypatch) == small


def test_a_micro_batch_that_does_not_fit_is_refused_with_what_to_use(monkeypatch):
    with pytest.raises(MemoryPlanError, match=r"batch 128 of resnet32 at 32 px needs about \d+ MiB at "
                                              r"micro_batch=128, and 102 MiB are free; use micro_batch=\d+ or "
                                              r"micro_batch=auto \(the hint\)"):
        _probe(0.1, 128, monkeypatch)
    with pytest.raises(MemoryPlanError, match="even one image per pass needs"):
        _probe(0.0001, 0, monkeypatch)


@needs_fmnist
def test_the_kill_is_replaced_by_a_message_before_training(tmp_path):
    proc = run_cli("teacher", "--set", "epochs=1", "--set", "micro_batch=128", "--out", str(tmp_path / "t"),
                   env={"DIVE_MEMORY_BUDGET_GIB": "0.05"}, check=False)
    assert proc.returncode == 2
    assert "batch 128 of resnet32 at 32 px needs about" in proc.stderr and "51 MiB are free" in proc.stderr
    assert 'TEACHER_SET="micro_batch=M"' in proc.stderr and "epoch 1/1" not in proc.stdout


@needs_fmnist
def test_auto_micro_batches_train_a_teacher_to_the_recipes_global_batch(tmp_path):
    out = tmp_path / "t"
    proc = run_cli("teacher", "--set", "epochs=1", "--out", str(out), env={"DIVE_MEMORY_BUDGET_GIB": "0.1"})
    assert "passes accumulate per step" in proc.stdout
    runtime = json.loads((out / "manifest.json").read_text())["config"]["runtime"]
    assert runtime["micro_batch"] == 0 and 128 % runtime["micro_batch_used"] == 0
    assert runtime["micro_batch_used"] < 128


@needs_fmnist
def test_a_diverging_teacher_is_stopped_at_the_teacher_stage(tmp_path):
    out = tmp_path / "t"
    proc = run_cli("teacher", "--set", "epochs=2", "--set", "lr=1e6", "--set", "warmup_epochs=0", "--out", str(out),
                   check=False)
    assert proc.returncode == 2, proc.stdout
    assert "the teacher diverged" in proc.stderr and "lr 1e+06: given" in proc.stderr
    assert "TEACHER_LR=" in proc.stderr and "warm-up" in proc.stderr
    assert not (out / "manifest.json").exists() and not (out / "model.pt").exists()
