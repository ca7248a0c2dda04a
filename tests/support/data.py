"""MNIST for the tests: fake (random MNIST-shaped tensors, the same for a given seed), or the first
samples of the real one, read once per session."""

from __future__ import annotations

from functools import cache
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


# The largest real slice an in-process test asks for: reading the IDX files costs ~0.3 s a time.
REAL_TRAIN, REAL_TEST = 400, 100


@cache
def _real_mnist():
    from trainer.data.mnist import load_mnist

    return load_mnist(None, REAL_TRAIN, REAL_TEST, fetch=False)


def real_mnist(n_train: int, n_test: int):
    """The first ``n_train`` / ``n_test`` samples of the cached MNIST (fetched beforehand), as
    ``load_mnist(None, n_train, n_test)`` returns them; copies, so a test may change them."""
    assert n_train <= REAL_TRAIN and n_test <= REAL_TEST, (n_train, n_test)
    data = _real_mnist()
    return type(data)(data.train_x[:n_train].clone(), data.train_y[:n_train].clone(),
                      data.test_x[:n_test].clone(), data.test_y[:n_test].clone())
