"""Accuracy overall, per class, and over the Many / Medium / Few class groups."""
from __future__ import annotations

import numpy as np

from pipeline.data.sources.base import GROUPS, class_groups


def accuracy_report(scores: np.ndarray, labels: np.ndarray, train_counts: np.ndarray) -> dict:
    """Top-1, per-class accuracy and group means (in percent) from per-sample logits [N, C] or predicted
    classes [N].

    Group accuracy is the mean of the group's per-class accuracies, as in OLTR and DiVE; on a balanced
    test split this equals the accuracy over the group's images.
    """
    scores = np.asarray(scores)
    preds = scores if scores.ndim == 1 else scores.argmax(axis=1)
    labels = np.asarray(labels)
    num_classes = len(train_counts)
    correct = np.bincount(labels, weights=(preds == labels), minlength=num_classes)
    seen = np.bincount(labels, minlength=num_classes)
    per_class = np.where(seen > 0, correct / np.maximum(seen, 1), np.nan) * 100.0
    report = {"top1": float((preds == labels).mean() * 100.0), "per_class": per_class.tolist(),
              "num_test": int(len(labels))}
    for group, mask in class_groups(train_counts).items():
        values = per_class[mask & (seen > 0)]
        report[group] = float(values.mean()) if len(values) else float("nan")
    return report


def format_table(rows: dict[str, dict]) -> str:
    """A small fixed-width table: one row per named report, columns top-1 / Many / Medium / Few."""
    head = f"{'model':<24}{'top-1':>8}" + "".join(f"{g.capitalize():>8}" for g in GROUPS)
    lines = [head, "-" * len(head)]
    for name, rep in rows.items():
        lines.append(f"{name:<24}{_cell(rep['top1'])}" + "".join(_cell(rep[g]) for g in GROUPS))
    return "\n".join(lines)


def _cell(value: float) -> str:
    """A percentage, or – for a group with no class (all of a rehearsal's classes are Few)."""
    return f"{'–':>8}" if value is None or np.isnan(value) else f"{value:>8.2f}"
