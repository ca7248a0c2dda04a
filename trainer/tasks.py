"""What a model is trained to do: its targets, loss, metric and output distribution.

The model config names the task (``model.task``), so the loop never asks which model it runs:

- ``classification`` (LBANN's MLP and CNN): targets are the labels, the loss softmax
  cross-entropy, the metric accuracy in %, the output distribution categorical;
- ``reconstruction`` (the autoencoder): targets are the images themselves, the loss the sigmoid
  cross-entropy summed over the 784 pixels, the metric the reconstruction's squared error
  summed over the pixels, the output distribution one Bernoulli per pixel.

Either loss is the mean over samples plus ½·l2·‖θ‖² (``model.l2``; 0 for the classifiers), so
the objective the logs and records report is the one the optimizer minimises
(docs/algorithm.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kfac_callback.estimation.outputs import Bernoulli, Categorical
from trainer.config import TASKS


@dataclass(frozen=True)
class Task:
    """One task: how targets, loss and metric are computed.

    Attributes:
        name: ``classification`` or ``reconstruction``.
        l2: the L2 coefficient η of the objective's ½η‖θ‖².
        metric_key: the records' name of the metric (``train_<key>``, ``test_<key>``).
        metric_label: LBANN's name of it in the log lines; ``metric_unit`` follows the value.
    """

    name: str
    l2: float = 0.0

    @property
    def output(self) -> Categorical | Bernoulli:
        """The output distribution K-FAC samples from and whose curvature it uses."""
        return Categorical() if self.name == "classification" else Bernoulli()

    @property
    def metric_key(self) -> str:
        return "accuracy" if self.name == "classification" else "mse"

    @property
    def metric_label(self) -> str:
        return "accuracy" if self.name == "classification" else "mean squared error"

    @property
    def metric_unit(self) -> str:
        return "%" if self.name == "classification" else ""

    def metric_value(self, value: float, digits: int = 6) -> str:
        """``97.50%`` (accuracy, two decimals) or the error to ``digits`` significant digits."""
        return f"{value:.2f}%" if self.metric_unit == "%" else f"{value:.{digits}g}"

    def metric_text(self, value: float) -> str:
        """``accuracy 97.50%`` or ``mean squared error 12.3``: the metric in a progress line."""
        return f"{self.metric_label} {self.metric_value(value)}"

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The targets of inputs ``x`` with labels ``y``."""
        return y if self.name == "classification" else x.flatten(1)

    def loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The data loss summed over the rows (no L2 term)."""
        return self.output.loss_sum(outputs, targets)

    def penalty(self, model: nn.Module) -> torch.Tensor | float:
        """½·l2·‖θ‖² (a plain 0 without L2: no extra graph)."""
        if not self.l2:
            return 0.0
        return 0.5 * self.l2 * sum((p * p).sum() for p in model.parameters() if p.requires_grad)

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The metric summed over the rows: correct predictions, or squared errors of the
        reconstruction sigmoid(outputs)."""
        with torch.no_grad():
            if self.name == "classification":
                return float((outputs.argmax(1) == targets).sum())
            return float(((torch.sigmoid(outputs.double()) - targets.double()) ** 2).sum())

    def metric(self, total: float, samples: float) -> float:
        """The reported metric from its sum over ``samples`` rows: % correct, or the mean squared
        error per sample (summed over pixels)."""
        return (100.0 if self.name == "classification" else 1.0) * total / samples


def make_task(name: str, l2: float = 0.0) -> Task:
    """The task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"model.task: {name!r} is not one of {', '.join(TASKS)}")
    return Task(name, float(l2))
