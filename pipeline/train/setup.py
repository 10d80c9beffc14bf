"""A stage's model, built and placed: seeded so every rank starts from the same weights, channels_last if
asked, wrapped in DDP under torchrun."""
from __future__ import annotations

import torch

from pipeline.data.sources import Source
from pipeline.models import build_model
from pipeline.settings import Training

from .distributed import Dist


def build_for(settings: Training, source: Source) -> torch.nn.Module:
    """The settings' model for this source, seeded with the run's seed."""
    torch.manual_seed(settings.seed)
    return build_model(settings.model, source.num_classes, source.in_channels, settings.experts)


def trainable_model(settings: Training, source: Source, dist: Dist) -> torch.nn.Module:
    """The settings' model on this rank's device, channels_last if asked, in DDP under torchrun."""
    model = build_for(settings, source).to(dist.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.nn.parallel.DistributedDataParallel(model) if dist.active else model
