"""LBANN's initialisers: LeCun-normal for fully connected layers, He-normal for convolutions."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Draws every Linear weight from N(0, 1/fan_in) and every Conv2d weight from N(0, 2/fan_in).

    Biases, where a layer has them, start at zero. The draws use torch's global generator, so a
    seed set before building the model fixes them.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, math.sqrt(1.0 / module.in_features))
        elif isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
        else:
            continue
        if module.bias is not None:
            module.bias.zero_()
