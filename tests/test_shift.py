import math

import numpy as np
import pytest

from pipeline.analysis.shift import post_compensate, shift_accuracies, shifted_counts, subset_indices


def test_forward_and_backward_counts_by_hand():
    train = np.array([10, 500, 50])  # frequency ranks: class 1 -> 0, class 2 -> 1, class 0 -> 2
    # Forward IF 4, n 100: rank r keeps floor(100 * (1/4)^(r/2)) = 100, 50, 25
    assert shifted_counts(train, 100, 4, "forward").tolist() == [25, 100, 50]
    # Backward: exponent (2 - r)/2 -> rank 0: 25, rank 1: 50, rank 2: 100
    assert shifted_counts(train, 100, 4, "backward").tolist() == [100, 25, 50]
    assert shifted_counts(train, 100, 1, "forward").tolist() == [100, 100, 100]
    assert shifted_counts(np.array([5, 4, 3, 2]), 1000, 50, "forward").tolist() == \
        [1000, math.floor(1000 * 50 ** (-1 / 3)), math.floor(1000 * 50 ** (-2 / 3)), 20]


def test_subsets_take_the_first_images_of_each_class_in_file_order():
    labels = np.array([0, 1, 0, 1, 0, 2, 1])
    assert subset_indices(labels, np.array([2, 1, 1])).tolist() == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="class 2"):
        subset_indices(labels, np.array([1, 1, 2]))


def test_post_compensation_by_hand():
    logits = np.array([[1.0, 0.5]])
    target, train = np.array([0.2, 0.8]), np.array([0.9, 0.1])
    bal = post_compensate(logits, target)
    assert bal[0] == pytest.approx([1 + math.log(0.2), 0.5 + math.log(0.8)])
    assert bal.argmax() == 1  # the target prior flips the decision
    ce = post_compensate(logits, target, train)
    assert ce[0] == pytest.approx([1 + math.log(0.2) - math.log(0.9), 0.5 + math.log(0.8) - math.log(0.1)])


def test_shift_accuracies_columns_and_uniform():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 100)
    logits = rng.normal(size=(400, 4))
    logits[np.arange(400), labels] += 1.0
    res = shift_accuracies(logits, labels, np.array([400, 100, 30, 5]), plain_ce=False)
    assert list(res["w/o PC"]) == ["Forward-50", "Forward-25", "Forward-10", "Forward-5", "Forward-2", "Uniform",
                                   "Backward-2", "Backward-5", "Backward-10", "Backward-25", "Backward-50"]
    assert res["w/o PC"]["Uniform"] == pytest.approx(((logits.argmax(1) == labels).mean()) * 100)


def test_post_compensation_on_shifted_priors_by_hand():
    """Two classes, 4 test images each (file order below), training counts 100 and 10.
    Forward-4 keeps class 0's four and class 1's first (prior 0.8, 0.2); Backward-4 keeps class 0's first and
    class 1's four (prior 0.2, 0.8). PC adds log prior: log(0.8 / 0.2) = 1.386 moves a margin of 1 either way."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    logits = np.array([[0, 1], [1, 0], [0, 1], [1, 0],  # class 0: wrong, right, wrong, right
                       [0, 1], [1, 0.5], [0, 1], [0, 1]], dtype=float)  # class 1: right, wrong, right, right
    res = shift_accuracies(logits, labels, np.array([100, 10]), plain_ce=False, imbalances=(4,))
    # Forward: w/o PC 2 of 4 and 1 of 1 -> 3/5; with PC both [0, 1] of class 0 flip to right, class 1's flips to
    # wrong -> 4/5
    assert (res["w/o PC"]["Forward-4"], res["w/ PC"]["Forward-4"]) == pytest.approx((60.0, 80.0))
    # Backward: w/o PC 0 of 1 and 3 of 4 -> 3/5; with PC class 1's [1, 0.5] flips to right -> 4/5
    assert (res["w/o PC"]["Backward-4"], res["w/ PC"]["Backward-4"]) == pytest.approx((60.0, 80.0))
    # a plain-CE model's PC also removes the training prior (log 10 towards class 1): on Forward-4 class 0's
    # [1, 0] stay right (1 - 0.128 > 0.789) and its [0, 1] stay wrong -> 3/5
    ce = shift_accuracies(logits, labels, np.array([100, 10]), plain_ce=True, imbalances=(4,))
    assert ce["w/ PC"]["Forward-4"] == pytest.approx(60.0)
