"""The models, by name: LBANN's MNIST K-FAC example's MLP and CNN, the MNIST deep autoencoder, and the
models users bring: a small ViT and a small ResNet (and its depthwise-separable variant)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.autoencoder import Autoencoder
from models.cnn import CNN
from models.mlp import MLP
from models.resnet import DepthwiseResNet, ResNet
from models.vit import ViT

MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "cnn": CNN, "autoencoder": Autoencoder, "vit": ViT,
                                              "resnet": ResNet, "resnet_dw": DepthwiseResNet}


def build_model(name: str) -> nn.Module:
    """Builds the model called ``name`` (a key of ``MODELS``)."""
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


__all__ = ["MODELS", "build_model", "Autoencoder", "CNN", "DepthwiseResNet", "MLP", "ResNet", "ViT"]
