import math

import pytest
import torch

from pipeline.losses import BalancedSoftmax, balanced_softmax_ce, build_loss, cross_entropy


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
    with pytest.raises(ValueError, match="every class"):
        BalancedSoftmax(torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("focal", torch.tensor([1, 1]))
