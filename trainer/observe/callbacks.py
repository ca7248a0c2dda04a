"""The trainer's own callbacks: batch and epoch timing, LBANN's log lines, memory.

The base class and its hooks are ``kfac_callback.base.Callback``.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch

from kfac_callback.base import Callback
from trainer.observe import lbann_log


class TimerCallback(Callback):
    """Times each training mini-batch and each epoch into ``trainer.stats``."""

    def on_epoch_begin(self, trainer: Any) -> None:
        trainer.stats.epoch_start = time.perf_counter()
        trainer.stats.batch_times = []

    def on_batch_begin(self, trainer: Any) -> None:
        self._batch_start = time.perf_counter()

    def on_batch_end(self, trainer: Any) -> None:
        trainer.stats.batch_times.append(time.perf_counter() - self._batch_start)

    def on_epoch_end(self, trainer: Any) -> None:
        trainer.stats.epoch_time = time.perf_counter() - trainer.stats.epoch_start


class PrintCallback(Callback):
    """Prints LBANN's epoch block and objective/accuracy lines on rank 0."""

    def on_epoch_end(self, trainer: Any) -> None:
        trainer.log(lbann_log.epoch_block(trainer.epoch, trainer.shape))
        task = trainer.task
        trainer.log(lbann_log.training_lines(trainer.epoch, trainer.stats, task.metric_label, task.metric_unit))

    def on_test_end(self, trainer: Any) -> None:
        task = trainer.task
        trainer.log(lbann_log.test_lines(trainer.stats.test_loss, trainer.stats.test_accuracy, task.metric_label,
                                         task.metric_unit))


class MemoryCallback(Callback):
    """Reports memory at each epoch end: CUDA memory on a GPU, peak RSS on the CPU."""

    def on_epoch_end(self, trainer: Any) -> None:
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
