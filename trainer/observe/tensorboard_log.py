"""TensorBoard scalars (``trainer.tensorboard=true``): the metrics record, one point per epoch.

Rank 0 writes ``<output_dir>/tensorboard``; other ranks write nothing. The writer (and its
directory) is made when training begins, not when the callback is built.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from kfac_callback.base import Callback


def epoch_scalars(trainer: Any) -> dict[str, float]:
    """The training scalars of the epoch just ended, plus every callback's ``metrics()``.

    Callback keys such as ``kfac_damping_act`` become ``kfac/damping_act``.
    """
    stats = trainer.stats
    times = stats.batch_times
    scalars = {
        "train/objective": stats.train_loss,
        f"train/{trainer.task.metric_key}": stats.train_accuracy,
        "time/epoch_run_time": stats.epoch_time,
        "time/minibatch_mean": sum(times) / len(times) if times else 0.0,
    }
    for callback in trainer.callbacks:
        extra = getattr(callback, "metrics", None)
        if callable(extra):
            for key, value in extra().items():
                if isinstance(value, (int, float)):
                    scalars[key.replace("_", "/", 1)] = float(value)
    return scalars


def evaluation_scalars(trainer: Any) -> dict[str, float]:
    """The test objective and accuracy of the last evaluation."""
    return {"test/objective": trainer.stats.test_loss, f"test/{trainer.task.metric_key}": trainer.stats.test_accuracy}


class TensorBoardCallback(Callback):
    """Writes the per-epoch scalars with the epoch (0-based, as in metrics.jsonl) as the step.

    Args:
        log_dir: The event file directory, normally ``<output_dir>/tensorboard``.
        rank: This process's rank; only rank 0 writes.

    Raises:
        RuntimeError: If the tensorboard package is missing (on rank 0).
    """

    def __init__(self, log_dir: str, rank: int = 0) -> None:
        self.log_dir = log_dir
        self.rank = rank
        self._writer: Optional[Any] = None
        self._t0 = time.time()
        if rank == 0:
            try:
                import tensorboard  # noqa: F401
            except ImportError as err:
                raise RuntimeError("trainer.tensorboard=true needs the tensorboard package "
                                   "(pip install tensorboard)") from err

    def on_setup_end(self, trainer: Any) -> None:
        """Starts the wall clock with the trainer's."""
        self._t0 = time.time()

    def on_train_begin(self, trainer: Any) -> None:
        """Opens the event file on rank 0."""
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)

    def _write(self, scalars: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.add_scalar("time/wall", time.time() - self._t0, step)
        self._writer.flush()

    def on_epoch_end(self, trainer: Any) -> None:
        """Writes the training scalars and the callbacks' metrics."""
        self._write(epoch_scalars(trainer), trainer.epoch)

    def on_test_end(self, trainer: Any) -> None:
        """Writes the test scalars; closes the file after the final test."""
        if trainer.stats.test_accuracy is None:
            return
        self._write(evaluation_scalars(trainer), trainer.epoch)
        if trainer.epoch >= trainer.epochs - 1 and self._writer is not None:
            self._writer.close()
            self._writer = None
