"""A small Vision Transformer for MNIST: 7×7 patches, 16 tokens and a class token.

Patch embedding (a 7×7 convolution of stride 7, 1→64), a learned class token and position
embedding, 2 pre-norm encoder blocks of ``nn.TransformerEncoderLayer`` (4 heads, GELU MLP of
width 128), a final LayerNorm and a Linear head on the class token. Built from PyTorch's own
layers, as a user's model is: K-FAC swaps its attention for ours when it attaches.
"""

from __future__ import annotations

import torch
from torch import nn


class ViT(nn.Module):
    """A Vision Transformer on 28×28 images (class logits from the class token)."""

    def __init__(self, num_classes: int = 10, width: int = 64, depth: int = 2, heads: int = 4, patch: int = 7) -> None:
        super().__init__()
        tokens = (28 // patch) ** 2
        self.patches = nn.Conv2d(1, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.zeros(1, tokens + 1, width))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images [n,1,28,28] to class logits [n,10]."""
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # n × 16 × width
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.position
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0]))
