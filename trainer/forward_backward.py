"""Forward and backward of a rank's share of a step, in k micro-batches (docs/algorithm.md §3).

Each micro-batch's loss is the sum over its samples divided by the rank's n, so the k backward
passes add up to the gradient of the rank's mean loss: the gradient, and K-FAC's factors, of
the whole share. A rank without samples still runs forward and backward, so that it takes
part in every collective and every K-FAC hook fires; it contributes zero (docs/algorithm.md §6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

from trainer.data.mnist import split_batch
from trainer.tasks import Task

# (loss, logits, inputs, targets): called once the step's loss is known, before the last
# backward (the trainer's on_forward_prop_end); logits, inputs and targets only with k = 1.
ForwardEnd = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]], None]


def forward_backward(model: nn.Module, task: Task, precision: Any, x: torch.Tensor, y: torch.Tensor, k: int,
                     forward_end: ForwardEnd) -> float:
    """Runs the share ``x, y`` forward and backward in ``k`` micro-batches under ``precision``
    (autocast, loss scale); returns the share's metric sum (the task's: correct predictions, or
    squared errors). ``forward_end`` gets the loss: the mean over the share, with the task's L2 term."""
    n = len(y)
    targets = task.targets(x, y)
    if k == 1:
        with precision.autocast():
            logits = model(x)
            loss = task.loss_sum(logits, targets) / n + task.penalty(model) if n else logits.sum() * 0
        # Read by callbacks at on_forward_prop_end (K-FAC's fisher=mc and adaptive rules).
        forward_end(loss, logits, x, targets)
        precision.scale(loss).backward()
        return task.metric_sum(logits, targets)
    # k micro-batches, every rank the same number (empty ones too: every K-FAC hook fires k
    # times on every rank).
    done = torch.zeros((), dtype=torch.float64)
    correct = 0.0
    sizes = split_batch(n, k)
    for m, (xm, ym) in enumerate(zip(torch.split(x, sizes), torch.split(targets, sizes), strict=True)):
        with precision.autocast():
            logits = model(xm)
            # The L2 term in shares n_m/n of the micro-batches: the k add up to one.
            loss = ((task.loss_sum(logits, ym) + len(ym) * task.penalty(model)) / n
                    if len(ym) else logits.sum() * 0)
        correct += task.metric_sum(logits, ym)
        if m == k - 1:
            forward_end(loss.detach().double() + done, None, None, None)
        done += loss.detach().double()
        precision.scale(loss).backward()
    return correct
