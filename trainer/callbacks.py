"""Callback base class (LBANN hook names) and the print, timer and memory callbacks.

The trainer calls every hook of every callback in one dispatch loop, in the order the
callbacks were given. Hooks receive the trainer, whose public attributes (``epoch``, ``step``,
``model``, ``comm``, ``stats``) are the state a callback may read.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from trainer import lbann_log

if TYPE_CHECKING:
    from trainer.trainer import Trainer

HOOKS = (
    "on_setup_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_batch_begin",
    "on_batch_end",
    "on_forward_prop_end",
    "on_backward_prop_end",
    "on_optimize_begin",
    "on_optimize_end",
    "on_test_begin",
    "on_test_end",
)


class Callback:
    """A set of no-op hooks; subclasses override the ones they need."""

    def on_setup_end(self, trainer: Trainer) -> None:
        """Called once the model, data, optimizer and callbacks are built."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Called before the first training epoch."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Called after the last training epoch (before the final test)."""

    def on_epoch_begin(self, trainer: Trainer) -> None:
        """Called at the start of each training epoch."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """Called after each training epoch, once its statistics are final."""

    def on_batch_begin(self, trainer: Trainer) -> None:
        """Called before the forward pass of each training mini-batch."""

    def on_batch_end(self, trainer: Trainer) -> None:
        """Called after the optimizer step of each training mini-batch."""

    def on_forward_prop_end(self, trainer: Trainer) -> None:
        """Called after the forward pass and loss of each training mini-batch."""

    def on_backward_prop_end(self, trainer: Trainer) -> None:
        """Called after the backward pass, once gradients are averaged over ranks."""

    def on_optimize_begin(self, trainer: Trainer) -> None:
        """Called just before the optimizer step."""

    def on_optimize_end(self, trainer: Trainer) -> None:
        """Called just after the optimizer step."""

    def on_test_begin(self, trainer: Trainer) -> None:
        """Called before evaluating the test set."""

    def on_test_end(self, trainer: Trainer) -> None:
        """Called after evaluating the test set, once its statistics are final."""


def rank0_print(comm: Any) -> Callable[[str], None]:
    """A print function that writes (and flushes) on rank 0 only."""

    def _print(line: str) -> None:
        if comm is None or comm.rank == 0:
            print(line, flush=True)

    return _print


class HookRecorder(Callback):
    """Records the name of every hook the trainer calls, in order (``calls``).

    For checking hook order, in tests and when writing a callback of one's own.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattribute__(self, name: str):
        if name in HOOKS:
            return lambda trainer: object.__getattribute__(self, "calls").append(name)
        return object.__getattribute__(self, name)


class TimerCallback(Callback):
    """Times each training mini-batch and each epoch into ``trainer.stats``."""

    def on_epoch_begin(self, trainer: Trainer) -> None:
        trainer.stats.epoch_start = time.perf_counter()
        trainer.stats.batch_times = []

    def on_batch_begin(self, trainer: Trainer) -> None:
        self._batch_start = time.perf_counter()

    def on_batch_end(self, trainer: Trainer) -> None:
        trainer.stats.batch_times.append(time.perf_counter() - self._batch_start)

    def on_epoch_end(self, trainer: Trainer) -> None:
        trainer.stats.epoch_time = time.perf_counter() - trainer.stats.epoch_start


class PrintCallback(Callback):
    """Prints LBANN's epoch block and objective/accuracy lines on rank 0."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        trainer.log(lbann_log.epoch_block(trainer.epoch, trainer.shape))
        trainer.log(lbann_log.training_lines(trainer.epoch, trainer.stats))

    def on_test_end(self, trainer: Trainer) -> None:
        trainer.log(lbann_log.test_lines(trainer.stats.test_loss, trainer.stats.test_accuracy))


class MemoryCallback(Callback):
    """Reports memory at each epoch end: CUDA memory on a GPU, peak RSS on the CPU."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        device = trainer.device
        if device.type == "cuda":
            line = lbann_log.gpu_memory_line(
                torch.cuda.memory_allocated(device),
                torch.cuda.max_memory_allocated(device),
                torch.cuda.get_device_properties(device).total_memory,
            )
        else:
            # ru_maxrss is in KiB on Linux.
            line = lbann_log.host_memory_line(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        trainer.log(line)
