"""The test-set evaluation: objective and accuracy over every rank's share of the test set."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kfac_callback.base import Communicator
from trainer.tasks import Task, make_task


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: Iterable[torch.Tensor],
             device: torch.device, comm: Communicator, task: Task | None = None) -> tuple[float, float]:
    """(Objective, metric) of ``model`` on the rows ``batches`` index, summed over ranks: the task's
    objective (with its L2 term) and metric (accuracy in % for classification).

    Sums, not means, are all-reduced, so uneven shares of the test set (docs/algorithm.md §6)
    count every sample once and every rank gets the same numbers; the model's training mode
    is restored afterwards.
    """
    task = task or make_task("classification")
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
