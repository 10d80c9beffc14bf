"""Models: every model returns a dict with ``logits`` [B, C] and ``features`` [B, D]; RIDE models add their
per-expert outputs. ``build_model`` is the one way the stages make a model by name."""
from __future__ import annotations

import torch.nn as nn

from .resnet import ResNet32, TorchvisionNet
from .ride import build_ride

MODELS = ("resnet32", "resnet50", "resnext50_32x4d")


def build_model(name: str, num_classes: int, in_channels: int = 3, experts: int = 0) -> nn.Module:
    """Build backbone ``name`` for ``num_classes`` classes and ``in_channels`` input channels.
    ``ride_<backbone>`` is that backbone as a RIDE model with ``experts`` experts (see ``pipeline.models.ride``)."""
    if name.startswith("ride_"):
        return build_ride(name.removeprefix("ride_"), num_classes, in_channels, experts)
    if name == "resnet32":
        return ResNet32(num_classes, in_channels)
    if name in ("resnet50", "resnext50_32x4d"):
        return TorchvisionNet(name, num_classes, in_channels)
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}, ride (or ride_<model>)")
