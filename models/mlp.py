"""LBANN's 3-layer MNIST MLP: ip1 784→1000, ReLU, ip2 1000→1000, ReLU, ip3 1000→10, no biases."""

from __future__ import annotations

import torch
from torch import nn

from models.init import init_weights


class MLP(nn.Module):
    """The fully connected network of LBANN's MNIST K-FAC example."""

    def __init__(self, width: int = 1000, num_classes: int = 10) -> None:
        super().__init__()
        self.ip1 = nn.Linear(28 * 28, width, bias=False)
        self.ip2 = nn.Linear(width, width, bias=False)
        self.ip3 = nn.Linear(width, num_classes, bias=False)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images [n,1,28,28] (or [n,784]) to class logits [n,10]."""
        x = x.flatten(1)
        x = torch.relu(self.ip1(x))
        x = torch.relu(self.ip2(x))
        return self.ip3(x)
