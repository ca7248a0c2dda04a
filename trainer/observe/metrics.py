"""``metrics.jsonl``: one JSON object a line, per epoch and per periodic test; its one writer.

The reader (``read_metrics``, ``parse_metrics``, ``epoch_records``) is ``launcher.workdir``'s.

An epoch record has no ``kind``; a test record of ``trainer.test_every_steps`` has ``"kind": "test"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from launcher.workdir import atomic_write_text


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # A test at an epoch's last step precedes that epoch's record.
    records = sorted([*history, *test_records], key=lambda r: (r["step"], r.get("kind") != "test"))
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
