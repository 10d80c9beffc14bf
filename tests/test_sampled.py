"""Codec sampled: topk's record plus K tail classes drawn by importance sampling (store/sampled.py)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.virtual import soft_targets_np
from store import codecs, sampled, topk


def logits(rows: int = 64, c: int = 30, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (rows, c)).astype(np.float32)


def test_top_k_stays_exact_and_the_draws_are_tail_classes_with_their_own_logits():
    z = logits()
    record = codecs.encode(z, "sampled", k=4)["logits"]
    assert record.shape == (64, 4 * 4 + 10) and record.dtype == np.uint16
    np.testing.assert_array_equal(record[:, :topk.width(4)], topk.encode(z, 4))  # topk's record, unchanged
    _, top_idx, _ = topk.split(record, 4)
    drawn, classes = sampled.split_draws(record, 4)
    assert not (classes[:, :, None] == top_idx[:, None, :]).any()  # never a top-K class
    np.testing.assert_array_equal(drawn, np.take_along_axis(z, classes, 1).astype(np.float16).astype(np.float32))
    dense = codecs.decode({"logits": record}, "sampled", c=30, k=4, sharpness=1 / 3)
    np.testing.assert_array_equal(np.take_along_axis(dense, top_idx, 1),
                                  np.take_along_axis(z, top_idx, 1).astype(np.float16).astype(np.float32))


def test_systematic_draws_hit_each_class_its_expected_number_of_times_give_or_take_one():
    z = logits(rows=200)
    top_idx = np.argsort(-z, axis=1)[:, :3]
    s = 9
    draws = sampled.tail_draws(z, top_idx, s, np.random.default_rng(0).random(200))
    weights = np.exp(sampled.PROPOSAL * z.astype(np.float64))
    np.put_along_axis(weights, top_idx, 0.0, axis=1)
    expected = s * weights / weights.sum(axis=1, keepdims=True)
    counts = np.zeros_like(expected)
    np.add.at(counts, (np.arange(200)[:, None], draws), 1)
    assert (np.abs(counts - expected) < 1 + 1e-9).all()


def test_decoded_targets_are_unbiased_where_the_proposal_is_the_target_and_nearly_so_elsewhere():
    """Averaged over many seeds of the draws, the decoded targets approach the exact ones: exactly in
    expectation at sharpness b0 (weights are the draw counts), up to the self-normalisation bias elsewhere."""
    z = logits(rows=1, c=24)
    truth = {beta: soft_targets_np(z, 1 / beta, 1.0)[0] for beta in (sampled.PROPOSAL, 1 / 3)}
    means = {beta: np.zeros(24) for beta in truth}
    seeds = 3000
    for seed in range(seeds):
        record = codecs.encode(z, "sampled", k=3, seed=seed)["logits"]
        for beta in truth:
            means[beta] += soft_targets_np(sampled.decode(record, 3, 24, beta), 1 / beta, 1.0)[0] / seeds
    mass = 1 - np.sort(truth[sampled.PROPOSAL])[-3:].sum()  # the tail's share, which the draws split
    np.testing.assert_allclose(means[sampled.PROPOSAL], truth[sampled.PROPOSAL], atol=0.01 * mass)  # measured 0.004
    np.testing.assert_allclose(means[1 / 3], truth[1 / 3], atol=0.03 * mass)  # 0.021; unweighted: 0.054
    one = soft_targets_np(sampled.decode(record, 3, 24, 1 / 3), 3.0, 1.0)[0]
    assert (one == 0).sum() >= 24 - 3 - 3  # a single view is sparse: at most K tail classes get mass


def test_the_same_seed_gives_the_same_draws_and_another_seed_others():
    z = logits()
    first, again = (codecs.encode(z, "sampled", k=4, seed=7)["logits"] for _ in range(2))
    other = codecs.encode(z, "sampled", k=4, seed=8)["logits"]
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_tail_mass_matches_topk_at_every_sharpness():
    z = logits()
    record = codecs.encode(z, "sampled", k=4)["logits"]
    for beta in (1 / 9, 1 / 3, 1.0):
        exact_tail = soft_targets_np(topk.decode(record[:, :topk.width(4)], 4, 30, beta), 1 / beta, 1.0)
        mine = soft_targets_np(sampled.decode(record, 4, 30, beta), 1 / beta, 1.0)
        top_idx = topk.split(record, 4)[1]
        np.testing.assert_allclose(np.take_along_axis(mine, top_idx, 1), np.take_along_axis(exact_tail, top_idx, 1),
                                   rtol=1e-5)


def test_sampled_needs_k_below_c_and_a_sharpness():
    with pytest.raises(ValueError, match="below C = 6"):
        codecs.encode(logits(c=6), "sampled", k=6)
    record = codecs.encode(logits(), "sampled", k=4)
    with pytest.raises(ValueError, match="sampled store decodes to logits for one target sharpness"):
        codecs.decode(record, "sampled", c=30, k=4)


def test_the_settings_know_the_store_codecs():
    """pipeline.settings imports the standard library only, so it keeps its own copy of the codec names."""
    from pipeline import settings
    assert settings.CODECS == codecs.CODECS and set(settings.SPARSE) == set(codecs.SPARSE)
