"""Tiny trainers on fake MNIST, one process on the CPU."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

from kfac_callback.base import Callback, SingleProcess
from models import build_model
from tests.support.data import tiny_data
from trainer.checkpoint import CheckpointPolicy
from trainer.optimizers import OptimizerConfig, build_optimizer
from trainer.trainer import Trainer


def make_trainer(callbacks: Sequence[Callback] = (), *, epochs: int = 1, batch: int = 10, n_train: int = 20,
                 data: Any = None, model: str = "mlp", optimizer: str = "adam", lines: Optional[list[str]] = None,
                 log: Optional[Callable[[str], None]] = None,
                 work_dir: Optional[Path] = None, dtype: Optional[torch.dtype] = None, **options: Any) -> Trainer:
    """A trainer of ``model`` (weights seeded 0) on ``tiny_data(n_train)`` unless ``data`` is given.

    Args:
        callbacks: Called at every hook, in order.
        epochs: Training epochs.
        batch: The global mini-batch size.
        n_train: Training samples of the fake data (10 test samples).
        data: Use this data instead.
        model: ``mlp`` or ``cnn``.
        optimizer: The optimizer's name (learning rate 0.01).
        lines: Collects the log lines (None: dropped).
        log: Takes the log lines instead.
        work_dir: Checkpoints (keep 2) in ``work_dir/checkpoints`` and metrics in
            ``work_dir/metrics.jsonl`` (None: neither).
        dtype: Of the weights and inputs (float64 for exact comparisons; None: as built and given).
        **options: Passed on to ``Trainer`` (``metrics_path``, ``test_every_epoch``, ...).
    """
    torch.manual_seed(0)
    net = build_model(model) if dtype is None else build_model(model).to(dtype)
    opt = build_optimizer(OptimizerConfig(name=optimizer, learning_rate=0.01), net.parameters())
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        options.setdefault("checkpoint", CheckpointPolicy(str(work_dir / "checkpoints"), keep=2,
                                                          work_dir=str(work_dir)))
        options.setdefault("metrics_path", str(work_dir / "metrics.jsonl"))
    if log is None:
        log = lines.append if lines is not None else (lambda line: None)
    data = data if data is not None else tiny_data(n_train)
    if dtype is not None and data.train_x.dtype != dtype:
        data = SimpleNamespace(train_x=data.train_x.to(dtype), train_y=data.train_y,
                               test_x=data.test_x.to(dtype), test_y=data.test_y)
    return Trainer(net, opt, data, epochs=epochs,
                   mini_batch_size=batch, callbacks=list(callbacks), comm=SingleProcess(),
                   device=torch.device("cpu"), seed=1, log=log, **options)
