"""Owner rank of each layer for every strategy (docs/algorithm.md §6)."""

from __future__ import annotations

import pytest

from kfac_callback.ranks.assignment import LayerInfo, assign_owners, inverse_cost

# The CNN of docs/algorithm.md §2 plus two BatchNorms, in model order.
LAYERS = [
    LayerInfo("conv1", "conv2d", (25, 20)),
    LayerInfo("bn1", "batchnorm", (40,)),
    LayerInfo("conv2", "conv2d", (500, 50)),
    LayerInfo("bn2", "batchnorm", (100,)),
    LayerInfo("ip1", "linear", (800, 500)),
    LayerInfo("ip2", "linear", (500, 10)),
]
NAMES = [layer.name for layer in LAYERS]


@pytest.mark.parametrize(("strategy", "world", "expected"), [
    ("all", 1, [0, 0, 0, 0, 0, 0]),
    ("all", 4, [0, 1, 2, 3, 0, 1]),
    ("each", 4, [0, 0, 1, 1, 0, 1]),
    ("each", 2, [0, 0, 1, 1, 0, 1]),
    ("root", 4, [0, 0, 0, 0, 0, 0]),
    # costs: ip1 637e6, conv2 125.1e6, ip2 125.0e6, bn2 1e6, bn1 64000, conv1 23625
    ("balanced", 2, [1, 1, 1, 1, 0, 1]),
    ("balanced", 3, [1, 1, 1, 2, 0, 2]),
])
def test_owner_tables(strategy: str, world: int, expected: list[int]) -> None:
    owners = assign_owners(LAYERS, world, strategy)
    assert list(owners) == NAMES  # model order
    assert list(owners.values()) == expected


def test_cost_is_sum_of_cubes() -> None:
    assert inverse_cost((800, 500)) == 800 ** 3 + 500 ** 3


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="balanced"):
        assign_owners(LAYERS, 2, "random")
