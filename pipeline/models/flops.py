"""FLOPs per image, counted with forward hooks on the convolutions and linear layers that actually run."""
from __future__ import annotations

import torch
import torch.nn as nn

from .ride import NormedLinear, RIDEModel


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


