"""The test-set evaluation: objective and accuracy over every rank's share of the test set (or of
the whole training set), at most once per step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from kfac_callback.base import Communicator
from trainer.data.mnist import epoch_batches
from trainer.tasks import Task


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: Iterable[torch.Tensor],
             device: torch.device, comm: Communicator, task: Task) -> tuple[float, float]:
    """(Objective, metric) of ``model`` on the rows ``batches`` index, summed over ranks: the task's
    objective (with its L2 term) and metric (accuracy in % for classification).

    Sums, not means, are all-reduced, so uneven shares of the test set (docs/algorithm.md §6)
    count every sample once and every rank gets the same numbers; the model's training mode
    is restored afterwards.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for index in batches:
        if not len(index):
            continue  # a rank's empty share adds nothing, and no collective waits inside the loop
        xb = x[index].to(device, non_blocking=True)
        yb = y[index].to(device, non_blocking=True)
        targets = task.targets(xb, yb)
        logits = model(xb)
        totals += torch.tensor([task.loss_sum(logits, targets).item(), task.metric_sum(logits, targets), len(yb)],
                               dtype=torch.float64)
    comm.allreduce_sum_([totals])
    model.train(was_training)
    penalty = float(task.penalty(model))
    return (totals[0] / totals[2]).item() + penalty, task.metric(float(totals[1]), float(totals[2]))


class Evaluator:
    """The test set and the whole training set of ``data``, each evaluated at most once per step.

    Every rank evaluates its share of each (never shuffled) batch and gets the same numbers. A
    second call at the same step (an epoch-end test right after a periodic one) returns the
    first call's result. The whole training set is evaluated as the test set is (in order, in
    eval mode): the objective itself, not the epoch's running mean over weights that kept changing.

    Attributes:
        last_test: ``(step, objective, metric)`` of the last test-set evaluation (None: none yet).
        last_train: The same, of the whole training set.
    """

    def __init__(self, model: nn.Module, data: Any, mini_batch_size: int, seed: int, comm: Communicator,
                 device: torch.device, task: Task) -> None:
        self.model, self.data, self.mini_batch_size, self.seed = model, data, mini_batch_size, seed
        self.comm, self.device, self.task = comm, device, task
        self.last_test: Optional[tuple[int, float, float]] = None
        self.last_train: Optional[tuple[int, float, float]] = None

    def test_set(self, step: int) -> tuple[float, float]:
        """(Objective, metric) on the test set at ``step``."""
        if self.last_test is None or self.last_test[0] != step:
            self.last_test = (step, *self._on(self.data.test_x, self.data.test_y))
        return self.last_test[1], self.last_test[2]

    def train_set(self, step: int) -> tuple[float, float]:
        """(Objective, metric) on the whole training set at ``step``."""
        if self.last_train is None or self.last_train[0] != step:
            self.last_train = (step, *self._on(self.data.train_x, self.data.train_y))
        return self.last_train[1], self.last_train[2]

    def _on(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        batches = epoch_batches(len(y), self.mini_batch_size, 0, self.seed, self.comm.rank,
                                self.comm.world_size, shuffle=False)
        return evaluate(self.model, x, y, batches, self.device, self.comm, self.task)
