"""A small ResNet for MNIST with BatchNorm, and its depthwise-separable variant (MobileNet-style).

Stem: 3×3 convolution 1→16, BatchNorm, ReLU. Three stages of one residual block each, widths
16, 32, 64 at 28², 14², 7² (stride 2 between stages; a 1×1 convolution and BatchNorm on the
shortcut where the shape changes). A block is two 3×3 convolutions with BatchNorm, or, in the
depthwise variant, two depthwise 3×3 (groups = channels) + pointwise 1×1 pairs. Global average
pooling and a Linear head.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(c_in: int, c_out: int, stride: int, depthwise: bool) -> nn.Sequential:
    """A 3×3 convolution with BatchNorm; depthwise: a depthwise 3×3 and a pointwise 1×1, each normalised."""
    if not depthwise:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                         nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


class Residual(nn.Module):
    """``relu(f(x) + shortcut(x))`` with f two normalised convolutions."""

    def __init__(self, c_in: int, c_out: int, stride: int, depthwise: bool) -> None:
        super().__init__()
        self.first = _conv(c_in, c_out, stride, depthwise)
        self.second = _conv(c_out, c_out, 1, depthwise)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.second(torch.relu(self.first(x))) + self.shortcut(x))


class ResNet(nn.Module):
    """The small ResNet (``depthwise``: its depthwise-separable variant)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64), depthwise: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(Residual(c_in, width, 1 if i == 0 else 2, depthwise))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images [n,1,28,28] to class logits [n,10]."""
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def DepthwiseResNet(num_classes: int = 10) -> ResNet:  # noqa: N802 (a model name, as the others)
    """The depthwise-separable variant."""
    return ResNet(num_classes, depthwise=True)
