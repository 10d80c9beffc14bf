"""A stage's model, built and placed: seeded so every rank starts from the same weights, channels_last if
asked, wrapped in DDP under torchrun."""
from __future__ import annotations

import torch

from pipeline.data.loaders import Batch
from pipeline.data.sources import Source
from pipeline.models import build_model
from pipeline.settings import MAKE_VARIABLES, Training

from .distributed import Dist
from .loop import unwrap
from .memory import plan_micro_batch, synthetic_batch_maker


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


def micro_batch_for(stage: str, settings: Training, model, loss_fn, source: Source, crop: int, dist: Dist,
                    distill: bool, log) -> int:
    """This rank's images per pass: measured (``micro_batch=auto``) or checked (a given micro_batch) with
    probe steps of the run's own model, loss and image shape. See ``pipeline.train.memory``."""
    local = settings.batch_size // dist.world
    per_rank = f" ({local} per rank)" if dist.world > 1 else ""
    what = f"batch {settings.batch_size}{per_rank} of {settings.model} at {crop} px"
    hint = f'{MAKE_VARIABLES[stage]["*"]}="micro_batch=M" with make, --set micro_batch=M with dive {stage}'
    make = synthetic_batch_maker(Batch, source.in_channels, crop, source.num_classes, teacher_logits=distill)
    return plan_micro_batch(unwrap(model), loss_fn, make, local, settings.micro_batch, dist.device, settings.bf16,
                            settings.channels_last, what, hint, log if dist.main else (lambda *a, **k: None))
