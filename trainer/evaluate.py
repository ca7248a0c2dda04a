"""The test-set evaluation: objective and accuracy over every rank's share of the test set."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from kfac_callback.base import Communicator


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: Iterable[torch.Tensor],
             device: torch.device, comm: Communicator) -> tuple[float, float]:
    """(Objective, accuracy in %) of ``model`` on the rows ``batches`` index, summed over ranks.

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
        logits = model(xb)
        totals += torch.tensor([F.cross_entropy(logits, yb, reduction="sum").item(),
                                (logits.argmax(1) == yb).sum().item(), len(yb)], dtype=torch.float64)
    comm.allreduce_sum_([totals])
    model.train(was_training)
    return (totals[0] / totals[2]).item(), (100.0 * totals[1] / totals[2]).item()
