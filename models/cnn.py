"""LBANN's 2-layer MNIST CNN (LeNet-like), no biases.

conv1 1→20 5×5, ReLU, max-pool 2×2/2; conv2 20→50 5×5, ReLU, max-pool 2×2/2 (800 features);
ip1 800→500, ReLU; ip2 500→10.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.init import init_weights


class CNN(nn.Module):
    """The convolutional network of LBANN's MNIST K-FAC example."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, bias=False)
        self.conv2 = nn.Conv2d(20, 50, 5, bias=False)
        self.ip1 = nn.Linear(800, 500, bias=False)
        self.ip2 = nn.Linear(500, num_classes, bias=False)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images [n,1,28,28] to class logits [n,10]."""
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2, 2)
        x = torch.relu(self.ip1(x.flatten(1)))
        return self.ip2(x)
