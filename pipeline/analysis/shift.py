"""Test-time label shift (DiVE Appendix C, the LADE protocol): Forward and Backward long-tailed test sets
built from a balanced test split, and post-compensation (PC) of a model's logits for a known test prior."""
from __future__ import annotations

import math

import numpy as np

IMBALANCES = (50, 25, 10, 5, 2)


def shifted_counts(train_counts: np.ndarray, n_test: int, imbalance: float, direction: str) -> np.ndarray:
    """Test images per class: rank classes by training frequency (r = 0 the most frequent) and give class r
    floor(n_test * (1/IF)^(r/(C-1))) (Forward) or the exponent (C-1-r)/(C-1) (Backward); IF 1 is uniform."""
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be forward or backward, got {direction!r}")
    c = len(train_counts)
    rank = np.empty(c, dtype=np.int64)
    rank[np.argsort(-np.asarray(train_counts), kind="stable")] = np.arange(c)
    exponent = rank / (c - 1) if direction == "forward" else (c - 1 - rank) / (c - 1)
    return np.array([math.floor(n_test * (1.0 / imbalance) ** e) for e in exponent], dtype=np.int64)


def subset_indices(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The first ``counts[c]`` test images of each class c, in file order (vectorized: 8,142 classes at iNat)."""
    labels, counts = np.asarray(labels), np.asarray(counts)
    have = np.bincount(labels, minlength=len(counts))
    short = np.flatnonzero(have < counts)
    if len(short):
        c = int(short[0])
        raise ValueError(f"class {c} has {have[c]} test images, the shifted set needs {counts[c]}")
    order = np.argsort(labels, kind="stable")  # by class, file order within a class
    starts = np.concatenate([[0], np.cumsum(have)[:-1]])
    rank = np.arange(len(order)) - starts[labels[order]]
    return np.sort(order[rank < counts[labels[order]]])


def post_compensate(logits: np.ndarray, target_prior: np.ndarray, train_prior: np.ndarray | None = None) -> np.ndarray:
    """PC: add log p_target to the logits; for a model trained with plain CE (whose logits carry the training
    prior) also subtract log p_train. Balanced-softmax models estimate balanced posteriors, so they add only
    log p_target."""
    # float32 at most: at iNaturalist's 24,426 x 8,142 a float64 copy alone would take 1.6 GB
    dtype = np.float32 if logits.dtype.itemsize <= 4 else logits.dtype
    adjusted = logits.astype(dtype) + np.log(np.maximum(target_prior, 1e-12)).astype(dtype)
    if train_prior is not None:
        adjusted = adjusted - np.log(np.maximum(train_prior, 1e-12)).astype(dtype)
    return adjusted


def shift_accuracies(logits: np.ndarray, labels: np.ndarray, train_counts: np.ndarray, plain_ce: bool,
                     imbalances=IMBALANCES) -> dict[str, dict[str, float]]:
    """Top-1 (percent) on every Forward / Uniform / Backward test set, without and with PC."""
    n_test = int(np.bincount(labels).min())
    train_prior = train_counts / train_counts.sum()
    sets = [(f"Forward-{f:g}", shifted_counts(train_counts, n_test, f, "forward")) for f in imbalances]
    sets.append(("Uniform", np.full(len(train_counts), n_test, dtype=np.int64)))
    sets += [(f"Backward-{f:g}", shifted_counts(train_counts, n_test, f, "backward")) for f in reversed(imbalances)]
    result: dict[str, dict[str, float]] = {"w/o PC": {}, "w/ PC": {}}
    for name, counts in sets:
        idx = subset_indices(labels, counts)
        prior = counts / counts.sum()
        plain = logits[idx].argmax(1) == labels[idx]
        comp = post_compensate(logits[idx], prior, train_prior if plain_ce else None).argmax(1) == labels[idx]
        result["w/o PC"][name] = float(plain.mean() * 100)
        result["w/ PC"][name] = float(comp.mean() * 100)
    return result
