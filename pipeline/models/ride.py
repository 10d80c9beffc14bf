"""RIDE multi-expert models (Wang et al., ICLR 2021, "Long-tailed recognition by routing diverse
distribution-aware experts"), as a model family of the pipeline.

The stem and the first stages are shared; each expert owns the later stages at a reduced width and a
normalized (cosine) classifier. For ResNet-32, as RIDE's CIFAR model builds it, the stem and layer1 are shared
and each expert owns layer2 and layer3 at 24 and 48 channels (32 and 64 in the plain model); for ResNet-50 and
ResNeXt-50 they own layer3 and layer4 at 3/4 of the width (192 and 384 bottleneck planes instead of 256 and 512).

A RIDE model returns the common output dict: ``logits`` (the experts' mean, what a cache stores as the teacher's
logits), ``features`` (the experts' mean feature), and ``expert_logits`` / ``expert_features`` stacked
[E, B, ...]. ``forward(x, experts=k)`` runs only the first k experts, which the router uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import Bottleneck

from .resnet import cifar_stage

RIDE_BACKBONES = ("resnet32", "resnet50", "resnext50_32x4d")
# RIDE's reduced widths of the expert-owned CIFAR ResNet-32 stages layer2 and layer3 (32 and 64 in the plain
# model), from RIDE's resnet_cifar.py with reduce_dimension.
CIFAR_EXPERT_WIDTHS = (24, 48)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(F.relu(self.bn1(self.conv1(x))))


def ride_resnet32(num_classes: int, in_channels: int, experts: int,
                  widths: tuple[int, int] = CIFAR_EXPERT_WIDTHS, blocks: int = 5) -> RIDEModel:
    """ResNet-32 with a shared stem and layer1, and ``experts`` copies of layer2 and layer3 at ``widths``."""
    trunk = _CifarTrunk(in_channels, blocks)
    w2, w3 = widths
    branches = [nn.Sequential(cifar_stage(16, w2, blocks, 2), cifar_stage(w2, w3, blocks, 2)) for _ in range(experts)]
    model = RIDEModel(trunk, branches, w3, num_classes)
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
