"""Curvature blocks: per layer type, the tensor math of K-FAC and the state it keeps.

A block holds one layer's running-average factors and inverses, turns the layer's captured
input and output gradient into factor contributions, and its gradient into the
preconditioned gradient. Public methods keep the books (counts, finiteness, dtypes); a small
core per layer type does the math. When things run is the callback's business.
"""

from __future__ import annotations

from torch import nn

from kfac_callback.blocks.base import Block, Dampings
from kfac_callback.blocks.batchnorm import BatchNormBlock
from kfac_callback.blocks.conv import Conv2dBlock
from kfac_callback.blocks.kronecker import KroneckerBlock
from kfac_callback.blocks.linear import LinearBlock

__all__ = ["BatchNormBlock", "Block", "Conv2dBlock", "Dampings", "KroneckerBlock", "LinearBlock",
           "is_preconditionable", "make_block", "preconditionable_layers"]


def make_block(name: str, module: nn.Module) -> Block | None:
    """The block for a supported layer, or ``None`` if the base optimizer keeps it.

    Raises:
        ValueError: For a supported type in a configuration K-FAC cannot precondition.
    """
    if isinstance(module, nn.Linear):
        return LinearBlock(name, module)
    if isinstance(module, nn.Conv2d):
        return Conv2dBlock(name, module)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.affine:
        return BatchNormBlock(name, module)
    return None


def is_preconditionable(module: nn.Module) -> bool:
    """Whether K-FAC has a block for this layer type (configuration not checked)."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) or (
        isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.affine)


def preconditionable_layers(model: nn.Module) -> list[str]:
    """The names of the model's layers K-FAC can precondition, in model order."""
    return [name for name, module in model.named_modules() if is_preconditionable(module)]
