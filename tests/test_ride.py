"""RIDE multi-expert models: shared and per-expert parameters, the diversity term, the per-expert DiVE loss,
the router, FLOPs, and the teacher -> cache -> student pipeline with MODEL=ride under torchrun."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.settings import student_settings, teacher_settings
from pipeline.train.losses import DiVELoss, RIDELoss, diversity_temperatures, diversity_term
from pipeline.models.resnet import ResNet32
from pipeline.models.flops import gflops_per_image
from pipeline.models.ride import build_ride, ride_resnet32
from pipeline.models.router import Router, route, router_targets
from pipeline.train.router import routing_loss

from store.reader import LogitStore

from .conftest import needs_fmnist, run_cli


def test_model_ride_is_the_datasets_backbone_as_experts():
    assert teacher_settings("fmnist-lt", ["model=ride"]).model == "ride_resnet32"
    assert teacher_settings("imagenet-lt", ["model=ride"]).model == "ride_resnext50_32x4d"
    assert teacher_settings("inat2018", ["model=ride"]).model == "ride_resnet50"
    assert teacher_settings("fmnist-lt", ["model=ride"]).experts == 6
    s = student_settings("imagenet-lt", ["model=ride"])  # RIDE-DiVE: 4 experts, alpha 0.75, tau 3
    assert (s.model, s.experts, s.alpha, s.tau) == ("ride_resnext50_32x4d", 4, 0.75, 3.0)
    assert student_settings("imagenet-lt", ["model=ride", "alpha=0.5"]).alpha == 0.5
    with pytest.raises(ValueError, match="no RIDE version"):
        build_ride("vgg16", 10, 3, 2)


def test_a_gradient_through_one_expert_touches_only_that_expert_and_the_trunk():
    torch.manual_seed(0)
    model = build_ride("resnet32", 10, 1, 3)
    out = model(torch.randn(4, 1, 32, 32))
    assert out["expert_logits"].shape == (3, 4, 10) and out["expert_features"].shape == (3, 4, 48)
    torch.testing.assert_close(out["logits"], out["expert_logits"].mean(0))
    out["expert_logits"][1].sum().backward()
    for i in range(3):
        grads = [p.grad for p in [*model.experts[i].parameters(), *model.heads[i].parameters()]]
        if i == 1:
            assert all(g is not None and g.abs().sum() > 0 for g in grads[:3])
        else:
            assert all(g is None or not g.any() for g in grads), f"expert {i} got a gradient"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trunk.parameters() if p.dim() > 1)


def test_flops_one_full_width_expert_is_the_plain_resnet32():
    plain = gflops_per_image(ResNet32(10, 3), (3, 32, 32))["total"]
    one = gflops_per_image(ride_resnet32(10, 3, experts=1, widths=(32, 64)), (3, 32, 32))
    assert one["total"] == pytest.approx(plain, rel=1e-9)
    # by hand: 2 x MACs of the stem, three stages of ten 3x3 convs (each stage's first conv reads the previous
    # width), and the classifier
    macs = (32 * 32 * 16 * 3 * 9 + 10 * 32 * 32 * 16 * 16 * 9 + 16 * 16 * 32 * 9 * (16 + 9 * 32)
            + 8 * 8 * 64 * 9 * (32 + 9 * 64) + 64 * 10)
    assert plain == pytest.approx(2 * macs / 1e9, rel=1e-12)


def test_ride_resnet32_flops_by_hand():
    """RIDE's CIFAR ResNet-32: the stem and layer1 shared; each expert owns layer2 at 24 and layer3 at 48
    channels and a cosine classifier. Every figure is worked out by hand, none from another count."""
    shared = 32 * 32 * 16 * 3 * 9 + 10 * 32 * 32 * 16 * 16 * 9  # stem, then layer1's ten 16 -> 16 convs
    layer2 = 16 * 16 * 24 * 9 * (16 + 9 * 24)  # at 16x16: the first conv reads 16 channels, nine more read 24
    layer3 = 8 * 8 * 48 * 9 * (24 + 9 * 48)  # at 8x8: the first conv reads 24 channels, nine more read 48
    expert = layer2 + layer3 + 48 * 10
    six = gflops_per_image(build_ride("resnet32", 10, 3, 6), (3, 32, 32))
    assert six["shared"] == pytest.approx(2 * shared / 1e9, rel=1e-12)
    assert six["per_expert"] == pytest.approx(2 * expert / 1e9, rel=1e-12)
    assert six["total"] == pytest.approx(2 * (shared + 6 * expert) / 1e9, rel=1e-12)
    model = build_ride("resnet32", 10, 3, 2)
    widths = [m.out_channels for m in model.experts[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [24] * 10 + [48] * 10


def test_diversity_temperatures_by_hand():
    # counts 3:1 -> p = (0.75, 0.25); w = 2 * p * 0.05 + 0.95 = (1.025, 0.975); T = w / max(w)
    torch.testing.assert_close(diversity_temperatures(torch.tensor([3, 1])), torch.tensor([1.0, 0.975 / 1.025]))


def test_diversity_term_value_and_sign_by_hand():
    experts = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])  # two experts, one image, two classes
    t = torch.ones(2)
    # the mean logits (1, 0) give the target (e/(1+e), 1/(1+e)); KL(target || softmax(expert)) by hand
    a, b = math.e / (1 + math.e), 1 / (1 + math.e)
    q2 = (math.exp(2) / (1 + math.exp(2)), 1 / (1 + math.exp(2)))
    kl1 = a * math.log(a / 0.5) + b * math.log(b / 0.5)
    kl2 = a * math.log(a / q2[0]) + b * math.log(b / q2[1])
    torch.testing.assert_close(diversity_term(experts, t), torch.tensor([kl1, kl2]), rtol=1e-5, atol=1e-6)
    # a temperature scales the logits per class and the term by mean(T)^2
    t2 = torch.tensor([2.0, 2.0])
    a2 = math.exp(0.5) / (1 + math.exp(0.5))
    kl1_t2 = a2 * math.log(a2 / 0.5) + (1 - a2) * math.log((1 - a2) / 0.5)
    assert float(diversity_term(experts, t2)[0]) == pytest.approx(4 * kl1_t2, rel=1e-5)
    # with RIDE's negative weight, a gradient step on the loss pushes the experts apart (the KL grows)
    z = experts.clone().requires_grad_(True)
    loss = RIDELoss("bsce", torch.tensor([1, 1]), diversity=-0.2)
    labels = torch.tensor([0])
    parts = loss({"expert_logits": z}, labels)
    bsce_only = sum(torch.nn.functional.cross_entropy(e, labels) for e in experts)
    assert parts["loss"].item() == pytest.approx(float(bsce_only) - 0.2 * (kl1 + kl2), rel=1e-5)
    div_only = -0.2 * diversity_term(z, t).sum()
    div_only.backward()
    with torch.no_grad():
        stepped = diversity_term(z - 0.5 * z.grad, t).sum()
    assert float(stepped) > kl1 + kl2


def test_ride_dive_loss_is_the_dive_loss_of_every_expert_summed():
    torch.manual_seed(0)
    counts = torch.tensor([50, 10, 2])
    experts, teacher = torch.randn(4, 8, 3), torch.randn(8, 3)
    labels = torch.randint(0, 3, (8,))
    tau, p, alpha = 3.0, 0.5, 0.75
    got = DiVELoss(counts, tau, p, alpha)({"logits": experts.mean(0), "expert_logits": experts}, labels, teacher)
    # each expert's DiVE loss from its definition: BSCE = CE(s + log n), and tau^2 KL(t || softmax(s / tau)) with
    # t the p-normalized softmax(z / tau)
    q = torch.softmax(teacher.double() / tau, -1) ** p
    t = q / q.sum(-1, keepdim=True)
    bsce, kd = [], []
    for s in experts.double():
        shifted = s + torch.log(counts.double())
        bsce.append(-(shifted.log_softmax(-1).gather(1, labels[:, None])).mean())
        kd.append(tau ** 2 * (t * (t.log() - (s / tau).log_softmax(-1))).sum(-1).mean())
    total = sum((1 - alpha) * b + alpha * k for b, k in zip(bsce, kd))
    assert got["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    assert got["kd"].item() == pytest.approx((sum(kd) / 4).item(), rel=1e-5)


def test_router_targets_and_loss_by_hand():
    # 3 experts, 3 images, 2 classes; labels all 0
    z = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]],    # expert 0: wrong, right, wrong
                      [[3.0, 0.0], [0.0, 5.0], [0.0, 1.0]],    # mean of 0..1: right, wrong, wrong
                      [[0.0, 0.0], [9.0, 0.0], [0.0, 1.0]]])   # mean of 0..2: right, right, wrong
    labels = torch.zeros(3, dtype=torch.long)
    targets = router_targets(z, labels)
    # after expert 0: image 0 is wrong and later right -> 1; image 1 right -> 0; image 2 never right -> 0
    # after expert 1: image 1 is wrong and right with all three -> 1
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # BCE at logit 0 is log 2 per element; positives weighted 20: mean over (20 + 1 + 1) / 3 log 2 per router
    assert float(routing_loss(logits, targets, 20.0)) == pytest.approx(22 / 3 * math.log(2), rel=1e-6)


def test_router_threshold_one_is_one_expert_and_zero_is_all_experts():
    torch.manual_seed(0)
    model = build_ride("resnet32", 10, 1, 4).eval()
    router = Router(model.feature_dim, 4, 10)
    x = torch.randn(6, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
        r = router(out["expert_features"], out["expert_logits"]) * 1e3  # saturated decisions either way
        all_experts, used = route(out["expert_logits"], r, 0.0)
        torch.testing.assert_close(all_experts, out["logits"])
        assert used.tolist() == [4.0] * 6
        one, used = route(out["expert_logits"], r, 1.0)
        torch.testing.assert_close(one, model(x, experts=1)["logits"])
        assert used.tolist() == [1.0] * 6
        some, used = route(out["expert_logits"], torch.tensor([[1.0] * 6, [-1.0] * 3 + [1.0] * 3,
                                                               [1.0] * 6]), 0.5)
        assert used.tolist() == [2.0] * 3 + [4.0] * 3  # stops after expert 1, or never; never comes back
        torch.testing.assert_close(some[:3], out["expert_logits"][:2, :3].mean(0))


@needs_fmnist
def test_ride_teacher_cache_and_routed_student_under_torchrun(tmp_path):
    teacher, cache, student = tmp_path / "teacher", tmp_path / "cache", tmp_path / "students" / "ride"
    run_cli("teacher", "--set", "model=ride", "--set", "experts=3", "--set", "epochs=1", "--out", str(teacher))
    t = json.loads((teacher / "manifest.json").read_text())
    assert t["config"]["teacher"]["model"] == "ride_resnet32" and t["config"]["teacher"]["experts"] == 3
    proc = run_cli("cache", "--teacher", str(teacher), "--set", "views=2", "--set", "expert_logits=true",
                   "--out", str(cache))
    assert "per-expert logits of the 3 experts add" in proc.stdout  # the size is printed before the dump
    # the cache's teacher logits are the ensemble's: the mean of the stored per-expert logits
    main, per_expert = LogitStore.open(cache / "logits.zarr"), LogitStore.open(cache / "expert_logits.zarr")
    assert per_expert.c == 3 * main.c and per_expert.attrs["experts"] == 3
    for view in range(2):
        z, params = main.read_rows(0, main.n, view)
        ze, params_e = per_expert.read_rows(0, main.n, view)
        np.testing.assert_array_equal(params, params_e)
        np.testing.assert_allclose(ze.reshape(main.n, 3, main.c).mean(1), z, atol=0.05)
    run_cli("student", "--cache", str(cache), "--set", "model=ride", "--set", "epochs=1", "--set", "router_epochs=1",
            "--out", str(student), nproc=2, env={"OMP_NUM_THREADS": "1"})
    s = json.loads((student / "manifest.json").read_text())
    settings = s["config"]["student"]
    assert settings["experts"] == 4 and settings["alpha"] == 0.75 and s["config"]["runtime"]["world"] == 2
    router = s["metrics"]["router"]
    # routed: the trunk, the experts consulted, and at most 3 router heads (embed 48 -> 16, then 16 + 10 -> 1)
    heads = 3 * 2 * (48 * 16 + (16 + 10)) / 1e9
    assert 1 <= router["experts"] <= 4 and router["gflops"] <= s["metrics"]["gflops"] + heads + 1e-12
    assert (student / "router.pt").is_file() and (student / "eval_routed.npz").is_file()
    report = run_cli("report", "--runs", str(tmp_path)).stdout
    for row in ("| RIDE, BSCE (teacher) | ride_resnet32 x3",
                "| RIDE-DiVE | tau 3, p 0.5, alpha 0.75; ride_resnet32 x4, 1 ep",
                "| RIDE-DiVE + router |"):
        assert row in report


def test_per_expert_logits_need_a_ride_teacher(small_cache, tmp_path):
    teacher, _ = small_cache
    proc = run_cli("cache", "--teacher", str(teacher), "--set", "expert_logits=true", "--out", str(tmp_path / "c"),
                   check=False)
    assert proc.returncode == 2 and "expert_logits=true needs a RIDE teacher" in proc.stderr
