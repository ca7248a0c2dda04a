"""Which rank owns each layer's inverses (docs/algorithm.md §6). Pure functions.

The owner computes the layer's inverses and preconditioned gradient; the other ranks receive
the result. LBANN's strategies are ``all``, ``each`` and ``root``; ``balanced`` is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class LayerInfo(NamedTuple):
    """What an assignment strategy may know about a layer.

    Attributes:
        name: The layer's name.
        kind: The layer type (``"linear"``, ``"conv2d"``, ``"batchnorm"``).
        dims: The sizes of its square factors.
    """

    name: str
    kind: str
    dims: tuple[int, ...]


def inverse_cost(dims: Sequence[int]) -> int:
    """Cost of a layer's inverses: Σ n³ over its factors (a decomposition is O(n³))."""
    return sum(n ** 3 for n in dims)


def assign_owners(layers: Sequence[LayerInfo], world_size: int, strategy: str) -> dict[str, int]:
    """Owner rank of every layer, in model order.

    Args:
        layers: The preconditioned layers in model order.
        world_size: The number of ranks.
        strategy: ``all`` (round-robin over layers), ``each`` (round-robin within each layer
            type), ``root`` (rank 0 owns everything) or ``balanced`` (largest cost first onto
            the least loaded rank, ties to the lower rank).

    Returns:
        ``{layer name: owner rank}``.

    Raises:
        ValueError: For an unknown strategy or ``world_size < 1``.
    """
    if world_size < 1:
        raise ValueError(f"assign_owners: world_size must be >= 1, got {world_size}")
    if strategy == "all":
        return {layer.name: i % world_size for i, layer in enumerate(layers)}
    if strategy == "each":
        seen: dict[str, int] = {}
        owners = {}
        for layer in layers:
            i = seen.get(layer.kind, 0)
            owners[layer.name] = i % world_size
            seen[layer.kind] = i + 1
        return owners
    if strategy == "root":
        return {layer.name: 0 for layer in layers}
    if strategy == "balanced":
        load = [0] * world_size
        owners = {}
        # sorted() is stable: equal costs keep model order, so the result is deterministic.
        for layer in sorted(layers, key=lambda x: -inverse_cost(x.dims)):
            rank = min(range(world_size), key=lambda r: (load[r], r))
            owners[layer.name] = rank
            load[rank] += inverse_cost(layer.dims)
        return {layer.name: owners[layer.name] for layer in layers}
    raise ValueError(f"unknown inverse strategy {strategy!r}; choose all, each, root or balanced")
