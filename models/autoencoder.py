"""The MNIST deep autoencoder of Hinton & Salakhutdinov (2006), as K-FAC's first paper trained it.

784-1000-500-250-30-250-500-1000-784, tanh between layers, a linear 30-unit code, and 784
logits: the reconstruction is sigmoid(logits), the loss the sigmoid cross-entropy against the
image itself (``trainer/tasks.py``, task ``reconstruction``).
"""

from __future__ import annotations

import torch
from torch import nn

from models.init import init_weights

WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
CODE = 4  # the index in WIDTHS of the linear code layer's output


class Autoencoder(nn.Module):
    """Encoder enc1-enc4 down to the 30-unit code, decoder dec1-dec4 back to 784 logits.

    Args:
        widths: the layer widths, input first (the default is the paper's network; tests use
            smaller ones).
    """

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        half = len(widths) // 2
        self.layers = nn.ModuleDict()
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            name = f"enc{i + 1}" if i < half else f"dec{i - half + 1}"
            self.layers[name] = nn.Linear(n_in, n_out)
        self.code = half  # after this many layers: no tanh (the linear code)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images [n,1,28,28] (or [n,784]) to reconstruction logits [n,784]."""
        x = x.flatten(1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers.values()):
            x = layer(x)
            if i != self.code - 1 and i != last:
                x = torch.tanh(x)
        return x
