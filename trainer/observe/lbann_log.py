"""LBANN's log lines and the per-epoch metrics file.

LBANN users parse these lines, so the text follows LBANN byte for byte; numbers use C++
iostream's default format, which is printf's ``%g`` (six significant digits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

RULE = "-" * 80


def g(value: float) -> str:
    """Formats a number as LBANN (C++ ostream default) does."""
    return format(value, "g")


@dataclass(frozen=True)
class EpochShape:
    """What LBANN's epoch header reports: iterations and mini-batch sizes per data set.

    A batch of B samples over W ranks gives rank r ``B // W`` samples, one more for the first
    ``B % W`` ranks (``trainer.data.mnist.split_batch``, docs/algorithm.md §6). The header shows
    that split as LBANN does: ``local MB`` is the base share ``B // W`` of a full batch (a
    plain number, as in LBANN's text; the first ``B % W`` ranks hold one more), and
    ``local last MB`` is ``base+extra`` of the last batch, ``extra`` being the samples left over
    for the first ranks, one each.
    """

    train_iters: int
    test_iters: int
    global_mb: int
    global_last_train: int
    global_last_test: int
    world_size: int

    @property
    def local_mb(self) -> int:
        """The base share of a full mini-batch: the smallest rank's."""
        return self.global_mb // self.world_size


def _last_local(last: int, world_size: int) -> str:
    # LBANN writes a last local mini-batch as base + the samples left over for some ranks.
    return f"{last // world_size:4d}+{last % world_size}"


def epoch_shape(train: Any, test: Any, global_mb: int, world_size: int) -> EpochShape:
    """The ``EpochShape`` of the training and test sets' batch plans (``trainer.data.mnist.BatchPlan``)."""
    return EpochShape(train_iters=train.iterations, test_iters=test.iterations, global_mb=global_mb,
                      global_last_train=train.global_last_batch, global_last_test=test.global_last_batch,
                      world_size=world_size)


def epoch_block(epoch: int, shape: EpochShape) -> str:
    """The framed header LBANN prints at the end of each training epoch."""
    s = shape
    return "\n".join(
        [
            RULE,
            f"[{epoch}] Epoch : stats formated [tr/v/te] iter/epoch = [{s.train_iters}/0/{s.test_iters}]",
            f"            global MB = [{s.global_mb:4d}/{0:4d}/{s.global_mb:4d}]"
            f" global last MB = [{s.global_last_train:4d}  /{0:4d}  /{s.global_last_test:4d}  ]",
            f"             local MB = [{s.local_mb:4d}/{0:4d}/{s.local_mb:4d}]"
            f"  local last MB = [{_last_local(s.global_last_train, s.world_size)}/"
            f"{_last_local(0, s.world_size)}/{_last_local(s.global_last_test, s.world_size)}]",
            RULE,
        ]
    )


def batch_time_stats(times: Sequence[float]) -> tuple[float, float, float, float]:
    """Mean, max, min and (population) standard deviation of mini-batch times."""
    if not times:
        return 0.0, 0.0, 0.0, 0.0
    mean = sum(times) / len(times)
    var = sum((t - mean) ** 2 for t in times) / len(times)
    return mean, max(times), min(times), math.sqrt(var)


def training_lines(epoch: int, stats: Any, metric: str = "accuracy", unit: str = "%") -> str:
    """LBANN's training objective, metric (accuracy, or the autoencoder's mean squared error),
    run time and mini-batch time lines."""
    p = f"model0 (instance 0) training epoch {epoch}"
    mean, mx, mn, sd = batch_time_stats(stats.batch_times)
    return "\n".join(
        [
            f"{p} objective function : {g(stats.train_loss)}",
            f"{p} {metric} : {g(stats.train_accuracy)}{unit}",
            f"{p} run time : {g(stats.epoch_time)}s",
            f"{p} mini-batch time statistics : {g(mean)}s mean, {g(mx)}s max, {g(mn)}s min, {g(sd)}s stdev",
        ]
    )


def test_lines(loss: float, accuracy: float, metric: str = "accuracy", unit: str = "%") -> str:
    """LBANN's test objective and metric (accuracy) lines."""
    return "\n".join(
        [
            f"model0 (instance 0) test objective function : {g(loss)}",
            f"model0 (instance 0) test {metric} : {g(accuracy)}{unit}",
        ]
    )


GIB = 1024.0**3


def gpu_memory_line(allocated: int, peak: int, total: int) -> str:
    """LBANN's GPU memory line, for this rank's device."""
    return (
        f"Model 0 GPU memory usage statistics : {g(allocated / GIB)} GiB current, "
        f"{g(peak / GIB)} GiB peak ({g(total / GIB)} GiB total)"
    )


def host_memory_line(peak_rss: int) -> str:
    """The CPU counterpart of LBANN's GPU memory line: this process's peak resident set."""
    return f"Model 0 host memory usage statistics : {g(peak_rss / GIB)} GiB peak RSS"

