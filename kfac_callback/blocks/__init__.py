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

__all__ = ["BLOCK_TYPES", "BatchNormBlock", "Block", "Conv2dBlock", "Dampings", "KroneckerBlock", "LinearBlock",
           "block_type", "build_blocks", "is_preconditionable", "make_block", "preconditionable_layers"]


# The block registry: which block class preconditions each supported module type.
BLOCK_TYPES: dict[type[nn.Module], type[Block]] = {
    nn.Linear: LinearBlock,
    nn.Conv2d: Conv2dBlock,
    nn.BatchNorm1d: BatchNormBlock,
    nn.BatchNorm2d: BatchNormBlock,
}


def block_type(module: nn.Module) -> type[Block] | None:
    """The block class for this layer's type (a subclass counts), or ``None``; BatchNorm only
    with learnable (affine) parameters."""
    for kind, block in BLOCK_TYPES.items():
        if isinstance(module, kind):
            return None if block is BatchNormBlock and not module.affine else block
    return None


def make_block(name: str, module: nn.Module) -> Block | None:
    """The block for a supported layer, or ``None`` if the base optimizer keeps it.

    Raises:
        ValueError: For a supported type in a configuration K-FAC cannot precondition.
    """
    block = block_type(module)
    return None if block is None else block(name, module)


def is_preconditionable(module: nn.Module) -> bool:
    """Whether K-FAC has a block for this layer type (configuration not checked)."""
    return block_type(module) is not None


def preconditionable_layers(model: nn.Module) -> list[str]:
    """The names of the model's layers K-FAC can precondition, in model order."""
    return [name for name, module in model.named_modules() if is_preconditionable(module)]


def build_blocks(model: nn.Module, disable: list[str]) -> dict[str, Block]:
    """``{layer name: block}`` of every preconditionable layer not in ``disable``, in model order.

    Raises:
        ValueError: A name in ``disable`` that is no preconditionable layer of the model (the
            message lists them), or a layer K-FAC cannot precondition.
    """
    candidates = preconditionable_layers(model)
    unknown = [name for name in disable if name not in candidates]
    if unknown:
        raise ValueError(f"kfac.disable_layers: unknown layer(s) {unknown}; the model's "
                         f"preconditionable layers are {candidates}")
    return {name: make_block(name, module) for name, module in model.named_modules()
            if name not in disable and is_preconditionable(module)}
