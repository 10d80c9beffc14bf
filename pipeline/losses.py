"""Losses. Each takes the model's output dict and the labels and returns a dict of named parts, with the
total under ``loss``, so the one training loop can log whatever parts a loss has."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain softmax cross-entropy: loss = -log softmax(s)_y."""
    ce = F.cross_entropy(outputs["logits"].float(), labels)
    return {"loss": ce, "ce": ce}


def balanced_softmax_ce(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Balanced Softmax (Ren et al., NeurIPS 2020): cross_entropy(s + log n_c, y).

    Adding the log class counts to the logits during training makes the softmax model the training label
    distribution, so the raw logits, used at test time, estimate a balanced posterior.
    """
    return F.cross_entropy(logits.float() + log_prior, labels)


class BalancedSoftmax:
    """BSCE as a loss over the model's output dict, for given training class counts."""

    def __init__(self, class_counts: torch.Tensor) -> None:
        counts = torch.as_tensor(class_counts, dtype=torch.float32)
        if (counts <= 0).any():
            raise ValueError("Balanced Softmax needs at least one training image in every class")
        self.log_prior = counts.log()

    def to(self, device: torch.device) -> "BalancedSoftmax":
        self.log_prior = self.log_prior.to(device)
        return self

    def __call__(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        bsce = balanced_softmax_ce(outputs["logits"], labels, self.log_prior)
        return {"loss": bsce, "bsce": bsce}


def build_loss(name: str, class_counts: torch.Tensor):
    """The teacher loss called ``name`` (``bsce`` or ``ce``)."""
    if name == "bsce":
        return BalancedSoftmax(class_counts)
    if name == "ce":
        return cross_entropy
    raise ValueError(f"unknown loss {name!r}; known: bsce, ce")
