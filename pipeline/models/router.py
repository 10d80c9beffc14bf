"""RIDE's expert-assignment router (the model side): the router heads, their training targets, test-time
routing and the routed FLOPs. Training the router lives in ``pipeline.train.router``."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Router(nn.Module):
    """RIDE's expert-assignment module: after expert i (for every expert but the last), a small head decides
    from expert i's pooled feature (normalized, embedded to ``hidden`` units) and the top-k logits of the mean
    of experts 0..i (sorted) whether to consult expert i + 1. The final linear layer is shared."""

    def __init__(self, feature_dim: int, experts: int, num_classes: int, top_k: int = 30, hidden: int = 16,
                 logit_scale: float = 30.0):
        super().__init__()
        if experts < 2:
            raise ValueError("a router needs at least two experts to choose between")
        self.top_k = min(top_k, num_classes)
        # The top logits enter divided by the classifiers' scale (cosines in [-1, 1]), so that they are on the
        # scale of the embedded features; raw logits of scale 30 gave BCE losses in the hundreds.
        self.logit_scale = float(logit_scale)
        self.embed = nn.ModuleList(nn.Linear(feature_dim, hidden) for _ in range(experts - 1))
        self.head = nn.Linear(hidden + self.top_k, 1)

    def forward(self, expert_features: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
        """Router logits [E - 1, B]: positive means "consult the next expert"."""
        with torch.autocast(expert_logits.device.type, enabled=False):
            out = []
            cumulative = torch.zeros_like(expert_logits[0], dtype=torch.float32)
            for i, embed in enumerate(self.embed):
                cumulative = cumulative + expert_logits[i].float()
                top = torch.topk(cumulative / ((i + 1) * self.logit_scale), self.top_k, dim=-1).values
                h = F.relu(embed(F.normalize(expert_features[i].float(), dim=-1)))
                out.append(self.head(torch.cat([h, top], dim=-1)).squeeze(-1))
            return torch.stack(out)


def router_targets(expert_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[E - 1, B] float: 1 where the mean of experts 0..i is wrong and the mean of some larger prefix is right,
    i.e. where consulting more experts helps."""
    experts = expert_logits.shape[0]
    prefix = expert_logits.float().cumsum(0) / torch.arange(1, experts + 1, device=expert_logits.device).view(-1, 1, 1)
    right = prefix.argmax(-1) == labels  # [E, B]
    later = right.flip(0).cumsum(0).flip(0) > 0  # right for some prefix j >= i
    return (~right[:-1] & later[1:]).float()


def route(expert_logits: torch.Tensor, router_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Test-time routing: every image consults expert 0; it goes on to expert i + 1 while the router's probability
    exceeds ``threshold`` and never comes back once it stops. Returns the mean logits of the experts each image
    consulted [B, C] and how many it consulted [B]. Threshold 1 gives one expert, 0 gives all of them."""
    cut = math.inf if threshold >= 1 else -math.inf if threshold <= 0 else math.log(threshold / (1 - threshold))
    total = expert_logits[0].float().clone()
    used = torch.ones(expert_logits.shape[1], device=expert_logits.device)
    active = torch.ones_like(used, dtype=torch.bool)
    for i in range(expert_logits.shape[0] - 1):
        active = active & (router_logits[i].float() > cut)
        total = total + torch.where(active[:, None], expert_logits[i + 1].float(), torch.zeros_like(total))
        used = used + active.float()
    return total / used[:, None], used


def routed_gflops(flops: dict[str, float], router: Router, experts_used: np.ndarray) -> float:
    """GFLOPs per image with routing: the trunk, the experts each image consulted, and the router heads it ran
    (one after each consulted expert but the last expert of the model), averaged over images."""
    head = router.head.in_features * 2 / 1e9
    embed = router.embed[0].in_features * router.embed[0].out_features * 2 / 1e9
    heads_run = np.minimum(experts_used, len(router.embed)).mean()
    return float(flops["shared"] + experts_used.mean() * flops["per_expert"] + heads_run * (head + embed))
