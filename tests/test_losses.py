import math

import pytest
import torch

from pipeline.train.losses import BalancedSoftmax, balanced_softmax_ce, build_loss, cross_entropy


def test_bsce_matches_hand_worked_value():
    # logits s = [1, 0], counts n = [4, 1], label 1:
    # s + log n = [1 + log 4, 0]; loss = -log(e^0 / (e^(1+log4) + e^0)) = log(4e + 1)
    logits = torch.tensor([[1.0, 0.0]])
    loss = balanced_softmax_ce(logits, torch.tensor([1]), torch.tensor([4.0, 1.0]).log())
    assert loss.item() == pytest.approx(math.log(4 * math.e + 1), rel=1e-6)


def test_bsce_equals_ce_with_balanced_counts():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    bsce = BalancedSoftmax(torch.full((5,), 7))({"logits": logits}, labels)
    ce = cross_entropy({"logits": logits}, labels)
    assert bsce["loss"].item() == pytest.approx(ce["loss"].item(), rel=1e-6)
    assert set(bsce) == {"loss", "bsce"} and set(ce) == {"loss", "ce"}


def test_bsce_favours_rare_class_logits():
    # With a head-heavy prior, BSCE charges more for under-scoring the tail class than CE does.
    logits, labels = torch.zeros(1, 2), torch.tensor([1])
    bsce = BalancedSoftmax(torch.tensor([100, 1]))({"logits": logits}, labels)["loss"].item()
    assert bsce == pytest.approx(math.log(101), rel=1e-6)
    assert bsce > cross_entropy({"logits": logits}, labels)["loss"].item()


def test_bsce_refuses_empty_classes_and_unknown_loss():
    with pytest.raises(ValueError, match="non-negative"):
        BalancedSoftmax(torch.tensor([3, -1]))
    # an empty class drops out of the softmax: the loss equals BSCE over the other classes
    three = BalancedSoftmax(torch.tensor([3, 0, 2]))({"logits": torch.tensor([[0.5, 4.0, -1.0]])}, torch.tensor([2]))
    two = BalancedSoftmax(torch.tensor([3, 2]))({"logits": torch.tensor([[0.5, -1.0]])}, torch.tensor([1]))
    assert three["loss"].item() == pytest.approx(two["loss"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("focal", torch.tensor([1, 1]))


# --- DiVE ---------------------------------------------------------------------------------------------------
from pipeline.train.losses import DiVELoss, soft_targets  # noqa: E402


def _kl(t, p):
    return sum(ti * math.log(ti / pi) for ti, pi in zip(t, p) if ti > 0)


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def test_power_normalized_targets_by_hand():
    # z = [2, 0, -1], tau 2: q = softmax([1, 0, -0.5]); p = 0.5: t = q^0.5 / sum q^0.5
    q = _softmax([1.0, 0.0, -0.5])
    root = [x ** 0.5 for x in q]
    expected = [x / sum(root) for x in root]
    got = soft_targets(torch.tensor([[2.0, 0.0, -1.0]]), tau=2.0, power=0.5)[0].tolist()
    assert got == pytest.approx(expected, rel=1e-6)


def test_dive_loss_value_by_hand():
    s, z, counts, y = [0.5, -0.2, 0.1], [2.0, 0.0, -1.0], [10.0, 5.0, 1.0], 2
    tau, p, alpha = 3.0, 0.5, 0.5
    # BSCE: cross-entropy of s + log n
    shifted = [a + math.log(n) for a, n in zip(s, counts)]
    bsce = -math.log(_softmax(shifted)[y])
    q = _softmax([v / tau for v in z])
    t = [x ** p for x in q]
    t = [x / sum(t) for x in t]
    kd = tau ** 2 * _kl(t, _softmax([v / tau for v in s]))
    loss = DiVELoss(torch.tensor(counts), tau, p, alpha)
    parts = loss({"logits": torch.tensor([s])}, torch.tensor([y]), torch.tensor([z]))
    assert parts["bsce"].item() == pytest.approx(bsce, rel=1e-6)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert parts["loss"].item() == pytest.approx((1 - alpha) * bsce + alpha * kd, rel=1e-5)


def test_dive_limits():
    torch.manual_seed(1)
    s, z, y = torch.randn(6, 4), torch.randn(6, 4) * 3, torch.randint(0, 4, (6,))
    counts = torch.tensor([50, 20, 5, 1])
    # alpha 0 is plain BSCE
    plain = BalancedSoftmax(counts)({"logits": s}, y)["loss"]
    assert DiVELoss(counts, 3.0, 0.5, 0.0)({"logits": s}, y, z)["loss"].item() == pytest.approx(plain.item(), rel=1e-6)
    # p = 1, tau = 1, alpha = 1 is plain KL(softmax(z) || softmax(s))
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.softmax(z, -1), reduction="batchmean")
    assert DiVELoss(counts, 1.0, 1.0, 1.0)({"logits": s}, y, z)["loss"].item() == pytest.approx(kl.item(), rel=1e-5)
    # a student equal to its (unnormalized) teacher has zero KD
    assert DiVELoss(counts, 2.0, 1.0, 1.0)({"logits": z}, y, z)["kd"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        DiVELoss(counts, 0.0, 0.5, 0.5)
