"""When a run ends early: a target test accuracy, a target full-train objective, a training-time
budget. Every number checked is the same on every rank, so all ranks stop together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from kfac_callback.base import Communicator
from trainer.observe.lbann_log import g


@dataclass
class StopTargets:
    """The targets of ``trainer.stop_at_test_accuracy``, ``trainer.stop_at_train_objective`` and
    ``trainer.max_train_seconds`` (None: no such target), and which were met."""

    test_accuracy: Optional[float] = None
    train_objective: Optional[float] = None
    max_train_seconds: Optional[float] = None
    reached: Optional[float] = None  # the test accuracy that met test_accuracy
    reached_objective: Optional[float] = None  # the full-train objective that met train_objective
    out_of_time: bool = False  # a periodic test found max_train_seconds spent

    def check_train_objective(self, loss: float) -> None:
        """A full-train objective at or below the target meets it."""
        if self.train_objective is not None and loss <= self.train_objective:
            self.reached_objective = loss

    def check_test(self, accuracy: float, train_time: float, comm: Communicator) -> None:
        """After a test: the target accuracy, and the time budget (a collective: every rank calls it)."""
        if self.test_accuracy is not None and accuracy >= self.test_accuracy:
            self.reached = accuracy
        if not self.out_of_time:
            self.out_of_time = self.budget_spent(lambda: train_time, comm)

    def budget_spent(self, train_time: Callable[[], float], comm: Communicator) -> bool:
        """Whether any rank has trained ``max_train_seconds`` (False without a budget; else a
        collective). Each rank's clock differs a little; the sum over ranks makes every rank decide alike."""
        if self.max_train_seconds is None:
            return False
        spent = torch.tensor([float(train_time() >= self.max_train_seconds)], dtype=torch.float64)
        comm.allreduce_sum_([spent])
        return bool(spent.item() > 0)

    def met(self) -> bool:
        """Whether any target was met."""
        return self.reached is not None or self.reached_objective is not None or self.out_of_time

    def end_lines(self, step: int, epoch: int, train_time: float) -> list[str]:
        """What a run cut short by its targets says, one line per target met."""
        lines = []
        if self.reached_objective is not None:
            lines.append(f"trainer: full training objective {self.reached_objective:.6g} <= "
                         f"trainer.stop_at_train_objective={g(self.train_objective)} at step {step} (epoch {epoch}) "
                         f"after {train_time:.1f}s of training; run stopped")
        if self.out_of_time:
            lines.append(f"trainer: {train_time:.1f}s of training >= trainer.max_train_seconds="
                         f"{g(self.max_train_seconds)} at step {step} (epoch {epoch}); run stopped")
        if self.reached is not None:
            lines.append(f"trainer: test accuracy {self.reached:.2f}% >= trainer.stop_at_test_accuracy="
                         f"{g(self.test_accuracy)} at step {step} (epoch {epoch}) after "
                         f"{train_time:.1f}s of training; run stopped")
        return lines
