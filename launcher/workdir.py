"""What a run's work dir is: its name (formatted and parsed here only), its files, how they are written.

A work dir is ``<experiment_dir>/<YYYYmmdd_HHMMSS>_<job_name>``, with ``_2``, ``_3`` ... when
that is taken, and holds::

    batch.sh       the run's script (executable)
    config.yaml    the composed config of the run
    out.log        what the ranks wrote to stdout
    err.log        what they wrote to stderr
    metrics.jsonl  one JSON object a line, per epoch and per periodic test
    job_id         the SLURM job id, when the run was submitted
    preempted      left by rank 0 after a signal made the run checkpoint and stop

Stdlib only: the launcher, the trainer and the reports all read and write through here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, Optional

SCRIPT_NAME = "batch.sh"
CONFIG_NAME = "config.yaml"
OUT_LOG = "out.log"
ERR_LOG = "err.log"
METRICS_FILE = "metrics.jsonl"
JOB_ID_FILE = "job_id"
PREEMPTED_FILE = "preempted"  # rank 0 writes it after a signal made the run checkpoint and stop

_STAMP = "%Y%m%d_%H%M%S"
_NAME = re.compile(r"(?P<stamp>\d{8}_\d{6})_(?P<job>.+?)(?:_(?P<suffix>\d+))?\Z")


class WorkDirName(NamedTuple):
    """The parts of a work dir's name: ``20240131_235959_kfac_2`` -> (``20240131_235959``, ``kfac``, 2)."""

    stamp: str
    job_name: str
    suffix: int  # 1: no suffix


def work_dir_name(job_name: str, now: datetime) -> str:
    """The name of a run's work dir: ``YYYYmmdd_HHMMSS_<job_name>``.

    Args:
        job_name: The job's name (``launcher.job_name``).
        now: The time the run was started, passed in by the caller.

    Returns:
        For example ``20240131_235959_kfac``.
    """
    return f"{now:{_STAMP}}_{job_name}"


def parse_work_dir_name(name: str) -> Optional[WorkDirName]:
    """The parts of a name made by ``work_dir_name`` (and ``choose_work_dir``'s suffix); None for others.

    A job name that itself ends in ``_<digits>`` reads as a suffix: ``..._run_2`` is job ``run``.
    """
    match = _NAME.match(name)
    if match is None:
        return None
    return WorkDirName(match["stamp"], match["job"], int(match["suffix"] or 1))


def choose_work_dir(experiment_dir: str | os.PathLike[str], job_name: str, now: datetime,
                    exists: Callable[[str], bool] = os.path.exists) -> Path:
    """The first free work dir for this run: ``<name>``, else ``<name>_2``, ``<name>_3`` ...

    Makes nothing; pure given ``exists``. The path is absolute when ``experiment_dir`` is.

    Args:
        experiment_dir: The folder that holds the work dirs of all runs.
        job_name: The job's name.
        now: The time the run was started.
        exists: Says whether a path is taken (``os.path.exists``; a set's ``__contains__`` in tests).

    Returns:
        ``experiment_dir / work_dir_name(job_name, now)``, with a suffix when that is taken.
    """
    base = Path(experiment_dir) / work_dir_name(job_name, now)
    candidate, n = base, 1
    while exists(os.fspath(candidate)):
        n += 1
        candidate = base.with_name(f"{base.name}_{n}")
    return candidate


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: Optional[int] = None) -> None:
    """Writes ``data`` to a temporary file beside ``path``, fsyncs it and renames it over ``path``.

    A reader (or a crash) sees the old file or the new one, never half of one.

    Args:
        path: The file to write; its folder must exist.
        data: The whole content.
        mode: Permission bits for the file (None: the umask's default).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a crash only once the folder is synced
        fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: Optional[int] = None) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def parse_metrics(text: str) -> list[dict[str, Any]]:
    """Every JSON object of a metrics.jsonl text; blank and unfinished (torn) lines are skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in file order; [] when there is no such file.

    Blank lines, lines that are not JSON objects and an unfinished last line (a run still
    writing, or killed mid-line) are skipped. Epoch records have no ``kind``; the periodic test
    records of ``trainer.test_every_steps`` have ``"kind": "test"``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return parse_metrics(text)


def epoch_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-epoch records (those without a ``kind`` other than ``epoch``)."""
    return [r for r in records if r.get("kind", "epoch") == "epoch"]
