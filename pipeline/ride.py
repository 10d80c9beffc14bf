"""RIDE multi-expert models (Wang et al., ICLR 2021, "Long-tailed recognition by routing diverse
distribution-aware experts"), as a model family of the pipeline.

The stem and the first stages are shared; each expert owns the last stage(s) at a reduced width and a
normalized (cosine) classifier. For ResNet-32 the experts own the last stage (48 channels instead of 64, RIDE's
reduced CIFAR width); for ResNet-50 and ResNeXt-50 they own layer3 and layer4 at 3/4 of the width (192 and 384
bottleneck planes instead of 256 and 512).

A RIDE model returns the common output dict: ``logits`` (the experts' mean, what a cache stores as the teacher's
logits), ``features`` (the experts' mean feature), and ``expert_logits`` / ``expert_features`` stacked
[E, B, ...]. ``forward(x, experts=k)`` runs only the first k experts, which the router uses.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import Bottleneck

from .models import cifar_stage

RIDE_BACKBONES = ("resnet32", "resnet50", "resnext50_32x4d")
CIFAR_EXPERT_WIDTH = 48  # RIDE's reduced last-stage width for CIFAR ResNet-32 (64 in the plain model)
IMAGENET_REDUCE = 0.75  # RIDE's reduced expert width for the ImageNet ResNets


class NormedLinear(nn.Module):
    """A cosine classifier: scale * <f / |f|, w_c / |w_c|>, computed in float32. The scale is learned (from
    ``scale``) or fixed."""

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0, learn_scale: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        with torch.autocast(feats.device.type, enabled=False):
            return self.scale * F.linear(F.normalize(feats.float(), dim=1), F.normalize(self.weight.float(), dim=1))


class RIDEModel(nn.Module):
    """Shared trunk, ``experts`` expert branches (each ending in pooled features), one cosine classifier each."""

    def __init__(self, trunk: nn.Module, branches: list[nn.Module], feature_dim: int, num_classes: int,
                 scale: float = 30.0, learn_scale: bool = False) -> None:
        super().__init__()
        if not branches:
            raise ValueError("a RIDE model needs at least one expert")
        self.trunk = trunk
        self.experts = nn.ModuleList(branches)
        self.heads = nn.ModuleList(NormedLinear(feature_dim, num_classes, scale, learn_scale) for _ in branches)
        self.feature_dim = feature_dim

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor, experts: int | None = None) -> dict[str, torch.Tensor]:
        k = self.num_experts if experts is None else experts
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"asked for {k} experts of {self.num_experts}")
        shared = self.trunk(x)
        feats = [F.adaptive_avg_pool2d(branch(shared), 1).flatten(1) for branch in self.experts[:k]]
        logits = [head(f) for head, f in zip(self.heads, feats)]
        expert_logits, expert_features = torch.stack(logits), torch.stack(feats)
        return {"logits": expert_logits.mean(0), "features": expert_features.float().mean(0),
                "expert_logits": expert_logits, "expert_features": expert_features}


class _CifarTrunk(nn.Module):
    def __init__(self, in_channels: int, blocks: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = cifar_stage(16, 16, blocks, 1)
        self.layer2 = cifar_stage(16, 32, blocks, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))


def ride_resnet32(num_classes: int, in_channels: int, experts: int, width: int = CIFAR_EXPERT_WIDTH,
                  blocks: int = 5) -> RIDEModel:
    """ResNet-32 with a shared stem, layer1 and layer2, and ``experts`` last stages of ``width`` channels."""
    trunk = _CifarTrunk(in_channels, blocks)
    branches = [cifar_stage(32, width, blocks, 2) for _ in range(experts)]
    model = RIDEModel(trunk, branches, width, num_classes)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
    return model


def _bottleneck_stage(inplanes: int, planes: int, blocks: int, stride: int, groups: int,
                      base_width: int) -> tuple[nn.Sequential, int]:
    """A torchvision bottleneck stage (as ResNet._make_layer builds it) and its output channels."""
    out = planes * Bottleneck.expansion
    down = None
    if stride != 1 or inplanes != out:
        down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    layers = [Bottleneck(inplanes, planes, stride, down, groups, base_width)]
    layers += [Bottleneck(out, planes, groups=groups, base_width=base_width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers), out


def ride_torchvision(name: str, num_classes: int, in_channels: int, experts: int,
                     reduce: float = IMAGENET_REDUCE) -> RIDEModel:
    """ResNet-50 / ResNeXt-50 with a shared stem, layer1 and layer2, and ``experts`` copies of layer3 and
    layer4 at ``reduce`` of their width."""
    net = getattr(torchvision.models, name)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
    groups, base_width = net.groups, net.base_width
    p3, p4 = int(256 * reduce), int(512 * reduce)
    if groups > 1:  # keep the grouped width divisible: planes * base_width / 64 channels per group
        p3, p4 = (p // 32 * 32 for p in (p3, p4))
    branches, feature_dim = [], 0
    for _ in range(experts):
        layer3, c3 = _bottleneck_stage(512, p3, 6, 2, groups, base_width)
        layer4, feature_dim = _bottleneck_stage(c3, p4, 3, 2, groups, base_width)
        branches.append(nn.Sequential(layer3, layer4))
    model = RIDEModel(trunk, branches, feature_dim, num_classes)
    for module in model.experts.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_ride(backbone: str, num_classes: int, in_channels: int, experts: int) -> RIDEModel:
    if experts < 1:
        raise ValueError(f"a RIDE model needs at least one expert, got {experts}")
    if backbone == "resnet32":
        return ride_resnet32(num_classes, in_channels, experts)
    if backbone in ("resnet50", "resnext50_32x4d"):
        return ride_torchvision(backbone, num_classes, in_channels, experts)
    raise ValueError(f"no RIDE version of {backbone!r}; known: {', '.join(RIDE_BACKBONES)}")


# --- FLOPs ------------------------------------------------------------------------------------------------


def count_macs(module: nn.Module, run) -> int:
    """Multiply-accumulates of the convolutions and linear layers inside ``module`` during ``run()``."""
    total = [0]

    def conv_hook(m, inputs, output):
        k = m.kernel_size[0] * m.kernel_size[1]
        total[0] += output.numel() // output.shape[0] * (m.in_channels // m.groups) * k

    def linear_hook(m, inputs, output):  # nn.Linear and NormedLinear: weight [out, in]
        total[0] += output.numel() // output.shape[0] * m.weight.shape[1]

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, (nn.Linear, NormedLinear)):
            hooks.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def gflops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """GFLOPs (2 x MACs) per image: the whole model, and for a RIDE model its shared trunk and one expert."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    try:
        whole = count_macs(model, lambda: model(x))
        out = {"total": 2 * whole / 1e9}
        if isinstance(model, RIDEModel):
            shared = count_macs(model.trunk, lambda: model.trunk(x))
            one = count_macs(model, lambda: model(x, experts=1)) - shared
            out.update(shared=2 * shared / 1e9, per_expert=2 * one / 1e9)
    finally:
        model.train(was_training)
    return out


# --- expert assignment (the router) -----------------------------------------------------------------------


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


def routing_loss(router_logits: torch.Tensor, targets: torch.Tensor, pos_weight: float = 20.0) -> torch.Tensor:
    """RIDE's weighted binary objective: BCE with the positives weighted ``pos_weight``, mean over routers."""
    weight = torch.tensor(pos_weight, device=router_logits.device)
    return torch.stack([F.binary_cross_entropy_with_logits(r, t, pos_weight=weight)
                        for r, t in zip(router_logits, targets)]).mean()


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


# --- training and testing the router ----------------------------------------------------------------------


def expert_outputs(model: RIDEModel, batch, device: torch.device, bf16: bool, channels_last: bool):
    """The frozen experts' (features, logits) on a batch, without gradients."""
    from .train import autocast, to_device

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


def routed_gflops(flops: dict[str, float], router: Router, experts_used: np.ndarray) -> float:
    """GFLOPs per image with routing: the trunk, the experts each image consulted, and the router heads it ran
    (one after each consulted expert but the last expert of the model), averaged over images."""
    head = router.head.in_features * 2 / 1e9
    embed = router.embed[0].in_features * router.embed[0].out_features * 2 / 1e9
    heads_run = np.minimum(experts_used, len(router.embed)).mean()
    return float(flops["shared"] + experts_used.mean() * flops["per_expert"] + heads_run * (head + embed))
