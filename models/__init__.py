"""The models, by name: LBANN's MNIST K-FAC example's MLP and CNN, and the MNIST deep autoencoder."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.autoencoder import Autoencoder
from models.cnn import CNN
from models.mlp import MLP

MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "cnn": CNN, "autoencoder": Autoencoder}


def build_model(name: str) -> nn.Module:
    """Builds the model called ``name`` ("mlp", "cnn" or "autoencoder")."""
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


__all__ = ["MODELS", "build_model", "Autoencoder", "CNN", "MLP"]
