"""Fake MNIST for the tests: random MNIST-shaped tensors in memory, the same for a given seed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch


def tiny_data(n_train: int = 20, n_test: int = 10, seed: int = 0, nan_sample: Optional[int] = None) -> SimpleNamespace:
    """``train_x, train_y, test_x, test_y`` as the trainer reads them: uniform pixels, random labels.

    Args:
        n_train: Training samples.
        n_test: Test samples.
        seed: Seeds the generator (drawn in the order train_x, train_y, test_x, test_y).
        nan_sample: This training sample gets one NaN pixel (None: all finite).
    """
    g = torch.Generator().manual_seed(seed)
    train_x = torch.rand(n_train, 1, 28, 28, generator=g)
    if nan_sample is not None:
        train_x[nan_sample, 0, 3, 3] = float("nan")
    return SimpleNamespace(train_x=train_x, train_y=torch.randint(0, 10, (n_train,), generator=g),
                           test_x=torch.rand(n_test, 1, 28, 28, generator=g),
                           test_y=torch.randint(0, 10, (n_test,), generator=g))
