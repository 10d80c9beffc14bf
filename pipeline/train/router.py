"""Training and testing RIDE's expert-assignment router with the experts frozen."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.ride import RIDEModel
from pipeline.models.router import Router, route, router_targets

from pipeline.device import autocast, to_device


def routing_loss(router_logits: torch.Tensor, targets: torch.Tensor, pos_weight: float = 20.0) -> torch.Tensor:
    """RIDE's weighted binary objective: BCE with the positives weighted ``pos_weight``, mean over routers."""
    weight = torch.tensor(pos_weight, device=router_logits.device)
    return torch.stack([F.binary_cross_entropy_with_logits(r, t, pos_weight=weight)
                        for r, t in zip(router_logits, targets)]).mean()


def expert_outputs(model: RIDEModel, batch, device: torch.device, bf16: bool, channels_last: bool):
    """The frozen experts' (features, logits) on a batch, without gradients."""
    with torch.no_grad(), autocast(device, bf16):
        out = model(to_device(batch.images, device, channels_last))
    return out["expert_features"].float(), out["expert_logits"].float()


def train_router(model: RIDEModel, router: Router, loader, epochs: int, device: torch.device, bf16: bool,
                 channels_last: bool, lr: float = 0.01, pos_weight: float = 20.0, log=print) -> list[dict]:
    """Train ``router`` with the experts frozen (BatchNorm in eval mode): SGD with Nesterov momentum 0.9,
    weight decay 5e-4, cosine decay over ``epochs`` (RIDE's router schedule)."""
    model.eval()
    router.train()
    opt = torch.optim.SGD(router.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    history = []
    steps = max(1, epochs * len(loader))
    step = 0
    for epoch in range(epochs):
        total, positives, count = 0.0, 0.0, 0
        for batch in loader.batches(epoch):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            feats, logits = expert_outputs(model, batch, device, bf16, channels_last)
            labels = batch.labels.to(device)
            targets = router_targets(logits, labels)
            loss = routing_loss(router(feats, logits), targets, pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total += loss.item() * len(labels)
            positives += float(targets.mean()) * len(labels)
            count += len(labels)
        history.append({"epoch": epoch + 1, "loss": total / count, "positives": positives / count})
        log(f"router epoch {epoch + 1}/{epochs}  loss {total / count:.4f}  "
            f"share of (image, step) pairs where more experts help {positives / count:.4f}")
    router.eval()
    return history


def evaluate_routed(model: RIDEModel, router: Router, batches, threshold: float, device: torch.device, bf16: bool,
                    channels_last: bool) -> dict[str, np.ndarray]:
    """Per-sample routed logits, experts consulted, labels and index over the test batches."""
    model.eval()
    router.eval()
    logits, used, labels, index = [], [], [], []
    for batch in batches:
        feats, expert_logits = expert_outputs(model, batch, device, bf16, channels_last)
        with torch.no_grad():
            routed, n = route(expert_logits, router(feats, expert_logits), threshold)
        logits.append(routed.cpu().numpy())
        used.append(n.cpu().numpy())
        labels.append(batch.labels.numpy())
        index.append(batch.index)
    return {"logits": np.concatenate(logits), "experts_used": np.concatenate(used),
            "labels": np.concatenate(labels), "index": np.concatenate(index)}


