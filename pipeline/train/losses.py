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
        if (counts < 0).any() or counts.sum() <= 0:
            raise ValueError("Balanced Softmax needs non-negative class counts with at least one image")
        # A class with no training image gets a prior of ~0 (log 1e-12): it then takes no part in the
        # softmax, as the exact -inf would, without risking inf - inf in the gradients.
        self.log_prior = counts.clamp_min(1e-12).log()

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


def soft_targets(teacher_logits: torch.Tensor, tau: float, power: float) -> torch.Tensor:
    """DiVE's teacher targets: q = softmax(z / tau), then power normalization t = q^p / sum_c q^p.

    Computed in log space: log t = p * log q - logsumexp(p * log q), which is softmax(p * z / tau).
    """
    return torch.softmax(teacher_logits.float() * (power / tau), dim=-1)


def kd_term(student_logits: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(t || softmax(s / tau)), averaged over the batch (Hinton et al. 2015 scaling)."""
    log_p = torch.log_softmax(student_logits.float() / tau, dim=-1)
    kl = (targets * (torch.log(targets.clamp_min(1e-30)) - log_p)).sum(dim=-1)
    return tau * tau * kl.mean()


class DiVELoss:
    """DiVE (He, Wu and Wei, ICCV 2021): loss = (1 - alpha) * BSCE(s, y) + alpha * tau^2 * KL(t || softmax(s/tau)),

    with s the student's raw logits, BSCE(s, y) = cross_entropy(s + log n_c, y), and t the power-normalized
    teacher distribution from the cached raw logits z (see ``soft_targets``). alpha 0 is plain BSCE;
    p = 1 and tau = 1 is plain KL to the teacher's softmax.
    """

    def __init__(self, class_counts: torch.Tensor, tau: float, power: float, alpha: float) -> None:
        if tau <= 0 or power <= 0 or not 0 <= alpha <= 1:
            raise ValueError(f"DiVE needs tau > 0, p > 0 and 0 <= alpha <= 1; got {tau}, {power}, {alpha}")
        self.bsce = BalancedSoftmax(class_counts)
        self.tau, self.power, self.alpha = tau, power, alpha

    def to(self, device: torch.device) -> "DiVELoss":
        self.bsce.to(device)
        return self

    def __call__(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor,
                 teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        targets = soft_targets(teacher_logits, self.tau, self.power)
        if "expert_logits" in outputs:  # RIDE-DiVE: every expert learns from the targets; summed over experts
            parts = [self._one(z, labels, targets) for z in outputs["expert_logits"]]
            return {"loss": torch.stack([p[0] for p in parts]).sum(),
                    "bsce": torch.stack([p[1] for p in parts]).mean(), "kd": torch.stack([p[2] for p in parts]).mean()}
        loss, bsce, kd = self._one(outputs["logits"], labels, targets)
        return {"loss": loss, "bsce": bsce, "kd": kd}

    def _one(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor):
        bsce = balanced_softmax_ce(logits, labels, self.bsce.log_prior)
        kd = kd_term(logits, targets, self.tau)
        return (1 - self.alpha) * bsce + self.alpha * kd, bsce, kd


# --- RIDE multi-expert losses -----------------------------------------------------------------------------


def diversity_temperatures(class_counts: torch.Tensor, base: float = 1.0, reweight: float = 0.05) -> torch.Tensor:
    """RIDE's class-dependent temperature T_c = base * w_c / max(w), w_c = C * p_c * r + 1 - r, with p_c the
    class frequency and r the reweight factor: 1 for the most frequent class, a little lower for rarer ones."""
    counts = torch.as_tensor(class_counts, dtype=torch.float32)
    p = counts / counts.sum()
    w = len(counts) * p * reweight + 1 - reweight
    return base * w / w.max()


def diversity_term(expert_logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """T_mean^2 * KL(softmax(mean / T) || softmax(expert / T)) for one expert, averaged over the batch, where
    ``mean`` is the experts' mean logits (a fixed target, no gradient) and T is per class."""
    with torch.no_grad():
        target = torch.softmax(expert_logits.mean(0).float() / temperature, dim=-1)
    t_mean = float(temperature.mean())
    terms = []
    for logits in expert_logits:
        log_q = torch.log_softmax(logits.float() / temperature, dim=-1)
        kl = (target * (torch.log(target.clamp_min(1e-30)) - log_q)).sum(-1).mean()
        terms.append(t_mean * t_mean * kl)
    return torch.stack(terms)


class RIDELoss:
    """A RIDE teacher's loss: for every expert, its own base loss (BSCE in place of RIDE's LDAM, or CE) plus
    ``diversity`` (negative: the experts are pushed apart) times its diversity term; summed over experts."""

    def __init__(self, base: str, class_counts: torch.Tensor, diversity: float = -0.2) -> None:
        self.base = build_loss(base, class_counts)
        self.key = "bsce" if base == "bsce" else "ce"
        self.temperature = diversity_temperatures(class_counts)
        self.diversity = diversity

    def to(self, device: torch.device) -> "RIDELoss":
        if hasattr(self.base, "to"):
            self.base.to(device)
        self.temperature = self.temperature.to(device)
        return self

    def __call__(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        experts = outputs["expert_logits"]
        base = torch.stack([self.base({"logits": z}, labels)["loss"] for z in experts])
        div = diversity_term(experts, self.temperature)
        return {"loss": (base + self.diversity * div).sum(), self.key: base.mean(), "diversity": div.mean()}


def build_teacher_loss(name: str, class_counts: torch.Tensor, ride: bool = False, diversity: float = -0.2):
    """The teacher's loss: ``name`` (bsce or ce), per expert with RIDE's diversity term for a RIDE model."""
    return RIDELoss(name, class_counts, diversity) if ride else build_loss(name, class_counts)
