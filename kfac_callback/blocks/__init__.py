"""Curvature blocks: per layer type, the tensor math of K-FAC and the state it keeps.

A block holds one layer's running-average factors and inverses, turns the layer's captured
input and output gradient into factor contributions, and its gradient into the
preconditioned gradient. Public methods keep the books (counts, finiteness, dtypes); a small
core per layer type does the math. When things run is the callback's business.
"""

from __future__ import annotations

from kfac_callback.blocks.base import Block, Dampings
from kfac_callback.blocks.conv import ConvBlock
from kfac_callback.blocks.embedding import EmbeddingBlock
from kfac_callback.blocks.kronecker import KroneckerBlock
from kfac_callback.blocks.linear import LinearBlock
from kfac_callback.blocks.norm import BatchNormBlock, GroupNormBlock, LayerNormBlock, NormBlock
from kfac_callback.blocks.registry import (
    BLOCK_TYPES,
    block_type,
    build_blocks,
    is_preconditionable,
    make_block,
    preconditionable_layers,
    uncovered_layers,
)

__all__ = ["BLOCK_TYPES", "BatchNormBlock", "Block", "ConvBlock", "Dampings", "EmbeddingBlock", "GroupNormBlock",
           "KroneckerBlock", "LayerNormBlock", "LinearBlock", "NormBlock", "block_type", "build_blocks",
           "is_preconditionable", "make_block", "preconditionable_layers", "uncovered_layers"]
