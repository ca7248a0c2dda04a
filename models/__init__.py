"""The models of LBANN's MNIST K-FAC example, by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.cnn import CNN
from models.mlp import MLP

MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "cnn": CNN}


def build_model(name: str) -> nn.Module:
    """Builds the model called ``name`` ("mlp" or "cnn")."""
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


__all__ = ["MODELS", "build_model", "CNN", "MLP"]
