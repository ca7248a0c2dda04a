"""``metrics.jsonl``: one JSON object a line, per epoch and per periodic test; its one writer.

The reader (``read_metrics``, ``parse_metrics``, ``epoch_records``) is ``launcher.workdir``'s.

An epoch record has no ``kind``; a test record of ``trainer.test_every_steps`` has ``"kind": "test"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from launcher.workdir import append_text, atomic_write_text
from trainer.observe.lbann_log import batch_time_stats


@dataclass
class Stats:
    """What the current epoch and the last test measured (read by the callbacks). The
    ``*_accuracy`` fields hold the task's metric (accuracy in %, or the reconstruction error)."""

    train_loss: float = float("nan")
    train_accuracy: float = float("nan")
    epoch_time: float = 0.0
    epoch_start: float = 0.0
    batch_times: list[float] = field(default_factory=list)
    test_loss: Optional[float] = None
    test_accuracy: Optional[float] = None


def epoch_record(epoch: int, step: int, stats: Stats, metric_key: str, learning_rate: float, wall_time: float,
                 callbacks: Sequence[Any], train_time: Optional[float] = None) -> dict[str, Any]:
    """An epoch's record: the epoch's statistics, its test (if one ran) and every callback's
    ``metrics()`` (K-FAC's dampings, say). ``wall_time`` and ``train_time`` (tests left out) are
    the run's seconds so far; a resumed run continues its checkpoint's."""
    mean, mx, mn, sd = batch_time_stats(stats.batch_times)
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "train_objective": stats.train_loss,
        f"train_{metric_key}": stats.train_accuracy,
        "learning_rate": learning_rate,
        "run_time": stats.epoch_time,
        "wall_time": wall_time,
        **({"train_time": train_time} if train_time is not None else {}),
        "minibatch_time": {"mean": mean, "max": mx, "min": mn, "stdev": sd},
    }
    if stats.test_accuracy is not None:
        record["test_objective"] = stats.test_loss
        record[f"test_{metric_key}"] = stats.test_accuracy
    for callback in callbacks:
        extra = getattr(callback, "metrics", None)
        if callable(extra):
            record.update(extra())
    return record


def periodic_test_record(step: int, epoch: int, epochs_done: float, train_time: float, wall_time: float, loss: float,
                accuracy: float, metric_key: str) -> dict[str, Any]:
    """A periodic test's record (``"kind": "test"``)."""
    return {
        "kind": "test", "step": step, "epoch": epoch, "epochs_done": epochs_done,
        "train_time": train_time, "wall_time": wall_time,
        "test_objective": loss, f"test_{metric_key}": accuracy,
    }


def append_metrics(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Appends one JSON object as a line of ``metrics.jsonl``."""
    append_text(path, json.dumps(record, sort_keys=True) + "\n")  # whole or not at all (a full disk)


def rewrite_metrics(path: str | os.PathLike[str], history: Iterable[dict[str, Any]],
                    test_records: Iterable[dict[str, Any]]) -> None:
    """Replaces the file (atomically) by these records, in the order they were written.

    A resumed run calls it so the file says what its checkpoint says: later records are dropped.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # A test at an epoch's last step precedes that epoch's record.
    records = sorted([*history, *test_records], key=lambda r: (r["step"], r.get("kind") != "test"))
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
