"""``metrics.jsonl``: one JSON object a line, per epoch and per periodic test; its one writer and reader.

An epoch record has no ``kind``; a test record of ``trainer.test_every_steps`` has ``"kind": "test"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

METRICS_FILE = "metrics.jsonl"


def append_metrics(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Appends one JSON object as a line of ``metrics.jsonl``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def rewrite_metrics(path: str | os.PathLike[str], history: Iterable[dict[str, Any]],
                    test_records: Iterable[dict[str, Any]]) -> None:
    """Replaces the file (atomically) by these records, in the order they were written.

    A resumed run calls it so the file says what its checkpoint says: later records are dropped.
    """
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
    # A test at an epoch's last step precedes that epoch's record.
    records = sorted([*history, *test_records], key=lambda r: (r["step"], r.get("kind") != "test"))
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
    os.replace(tmp, path)


def parse_metrics(text: str) -> list[dict[str, Any]]:
    """Every JSON object of a metrics.jsonl text; blank and unfinished (partial) lines are skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def epoch_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-epoch records (those without a ``kind`` other than ``epoch``)."""
    return [r for r in records if r.get("kind", "epoch") == "epoch"]
