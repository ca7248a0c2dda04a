"""Which block preconditions which layer, and what of a model K-FAC leaves to the base optimizer
(docs/algorithm.md §3, "Layers")."""

from __future__ import annotations

from torch import nn

from kfac_callback.blocks.base import Block
from kfac_callback.blocks.conv import ConvBlock
from kfac_callback.blocks.embedding import EmbeddingBlock
from kfac_callback.blocks.kronecker import KroneckerBlock
from kfac_callback.blocks.linear import LinearBlock
from kfac_callback.blocks.norm import BatchNormBlock, GroupNormBlock, LayerNormBlock
from kfac_callback.layers import InProjection

# The block registry: which block class preconditions each supported module type (a subclass counts).
BLOCK_TYPES: dict[type[nn.Module], type[Block]] = {
    nn.Linear: LinearBlock,
    InProjection: LinearBlock,
    nn.Conv1d: ConvBlock,
    nn.Conv2d: ConvBlock,
    nn.BatchNorm1d: BatchNormBlock,
    nn.BatchNorm2d: BatchNormBlock,
    nn.LayerNorm: LayerNormBlock,
    nn.GroupNorm: GroupNormBlock,
    nn.Embedding: EmbeddingBlock,
}


def _has_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in (getattr(module, "weight", None), getattr(module, "bias", None)))


def _in_functional_attention(name: str, model: nn.Module) -> bool:
    """Whether ``name`` is the ``out_proj`` of an ``nn.MultiheadAttention``, which never calls it."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    return child == "out_proj" and isinstance(owner, nn.MultiheadAttention) and not hasattr(owner, "in_proj")


def block_type(module: nn.Module) -> type[Block] | None:
    """The block class for this layer, or ``None``: a type without one, a normalisation without
    affine parameters, a sparse embedding."""
    for kind, block in BLOCK_TYPES.items():
        if isinstance(module, kind):
            if not _has_parameters(module) or getattr(module, "sparse", False):
                return None
            return block
    return None


def make_block(name: str, module: nn.Module, weight_sharing: str = "expand") -> Block | None:
    """The block for a supported layer, or ``None`` if the base optimizer keeps it."""
    block = block_type(module)
    if block is None:
        return None
    return block(name, module, weight_sharing) if issubclass(block, KroneckerBlock) else block(name, module)


def is_preconditionable(module: nn.Module) -> bool:
    """Whether K-FAC has a block for this layer."""
    return block_type(module) is not None


def preconditionable_layers(model: nn.Module) -> list[str]:
    """The names of the model's layers K-FAC can precondition, in model order (not the
    projections of an ``nn.MultiheadAttention``, which its hooks never see)."""
    return [name for name, module in model.named_modules()
            if is_preconditionable(module) and not _in_functional_attention(name, model)]


def build_blocks(model: nn.Module, disable: list[str], weight_sharing: str = "expand") -> dict[str, Block]:
    """``{layer name: block}`` of every preconditionable layer not in ``disable``, in model order.

    Raises:
        ValueError: A name in ``disable`` that is no preconditionable layer of the model (the
            message lists them).
    """
    candidates = preconditionable_layers(model)
    unknown = [name for name in disable if name not in candidates]
    if unknown:
        raise ValueError(f"kfac.disable_layers: unknown layer(s) {unknown}; the model's "
                         f"preconditionable layers are {candidates}")
    return {name: make_block(name, model.get_submodule(name), weight_sharing) for name in candidates
            if name not in disable}


def uncovered_layers(model: nn.Module, blocks: dict[str, Block]) -> list[tuple[str, str]]:
    """``(name, type)`` of every module holding parameters of its own that no block covers, in
    model order (not the layers ``kfac.disable_layers`` names: the options line lists those); the
    model itself is named ``model``."""
    covered = {id(p) for b in blocks.values() for p in b.parameters()}
    preconditionable = set(preconditionable_layers(model))
    found = []
    for name, module in model.named_modules():
        if name in preconditionable:
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in covered]
        if own:
            found.append((name or "model", type(module).__name__))
    return found
