"""The models, by name: LBANN's MNIST K-FAC example's MLP and CNN, the MNIST deep autoencoder, and the
models users bring: a small ViT and a small ResNet (and its depthwise-separable variant).

The names are known without importing torch (the config's validation needs only them); a model's
module is imported when it is built or its class first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from models.autoencoder import Autoencoder
    from models.cnn import CNN
    from models.mlp import MLP
    from models.resnet import DepthwiseResNet, ResNet
    from models.vit import ViT

# name -> (module, class)
MODELS: dict[str, tuple[str, str]] = {
    "mlp": ("models.mlp", "MLP"), "cnn": ("models.cnn", "CNN"), "autoencoder": ("models.autoencoder", "Autoencoder"),
    "vit": ("models.vit", "ViT"), "resnet": ("models.resnet", "ResNet"), "resnet_dw": ("models.resnet", "DepthwiseResNet"),
}
CLASSES = {cls: module for module, cls in MODELS.values()}


def build_model(name: str) -> nn.Module:
    """Builds the model called ``name`` (a key of ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    module, cls = MODELS[name]
    return getattr(importlib.import_module(module), cls)()


def __getattr__(name: str) -> Any:
    """A model class (``from models import MLP``), imported on first use."""
    if name in CLASSES:
        return getattr(importlib.import_module(CLASSES[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


__all__ = ["MODELS", "build_model", "Autoencoder", "CNN", "DepthwiseResNet", "MLP", "ResNet", "ViT"]
