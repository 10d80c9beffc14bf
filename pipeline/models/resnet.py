"""Backbones. Every model returns a dict: ``logits`` [B, C] and ``features`` [B, D] (penultimate layer).

The classifier always runs in float32, also under bfloat16 autocast: it costs nothing, and the logits are
what the cache stores and what soft targets are made from, so they keep full precision.

Returning a dict keeps the training loop and the losses free of any assumption that a model gives one
tensor; multi-expert models (RIDE) add their per-expert outputs under more keys.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

def classify(fc: nn.Linear, feats: torch.Tensor) -> torch.Tensor:
    """The linear classifier in float32, outside any autocast region."""
    with torch.autocast(feats.device.type, enabled=False):
        return fc(feats.float())


class BasicBlock(nn.Module):
    """CIFAR ResNet block with a parameter-free shortcut (option A: subsample, zero-pad channels)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.extra = c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.extra == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def cifar_stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    """One stage of ``blocks`` basic blocks, the first with ``stride``."""
    layers = [BasicBlock(c_in, c_out, stride)] + [BasicBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet32(nn.Module):
    """CIFAR-style ResNet-32: a 3x3 stem, then 3 stages of 5 basic blocks at 16/32/64 channels."""

    def __init__(self, num_classes: int, in_channels: int = 3, blocks: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = cifar_stage(16, 16, blocks, 1)
        self.layer2 = cifar_stage(16, 32, blocks, 2)
        self.layer3 = cifar_stage(32, 64, blocks, 2)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        return {"logits": classify(self.fc, feats), "features": feats}


class TorchvisionNet(nn.Module):
    """A torchvision ImageNet backbone (random init) returning the common output dict."""

    def __init__(self, name: str, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.fc = net.fc
        net.fc = nn.Identity()
        self.body = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        return {"logits": classify(self.fc, feats), "features": feats}
