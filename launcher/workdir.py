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

import errno
import json
import os
import re
import shutil
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


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(RuntimeError):
    """A write failed for lack of space; the message is the one line to show (``no_space_message``)."""


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def no_space_message(path: str | os.PathLike[str], needed: Optional[int] = None) -> str:
    """One line: the file, the free space, what to do (written files before it are kept)."""
    target = Path(path)
    folder = next((p for p in target.parents if p.is_dir()), Path("."))
    work_dir = next((p for p in target.parents if (p / CONFIG_NAME).is_file()), folder)
    try:
        free = _megabytes(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    need = f", {_megabytes(needed)} needed" if needed else ""
    return (f"no space left on device writing {target} ({free} free there{need}); nothing partial was left and "
            f"the checkpoints before it are kept: free space there (or move {work_dir} to a disk with room), "
            f"then continue with trainer.resume={work_dir}")


def is_no_space(err: BaseException) -> bool:
    """Whether ``err`` is a write that failed for lack of space (ENOSPC, or a quota: EDQUOT)."""
    return isinstance(err, OSError) and err.errno in _NO_SPACE


class AppendLog:
    """A file written by appends, each whole or not at all: a write that fails (a full disk)
    is cut back off, and a full disk raises ``DiskFullError`` once, after which writes are dropped
    (so the line that reports it can still be printed)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text: str) -> None:
        """Appends ``text`` whole, or leaves the file as it was."""
        if self._fd is None or not text:
            return
        data = text.encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as err:
            os.ftruncate(self._fd, size)
            if is_no_space(err):
                self.close()
                raise DiskFullError(no_space_message(self.path)) from None
            raise

    def close(self) -> None:
        """Closes the file (further writes are dropped)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def append_text(path: str | os.PathLike[str], text: str) -> None:
    """Appends ``text`` to ``path`` whole or not at all (``AppendLog``)."""
    log = AppendLog(path)
    try:
        log.write(text)
    finally:
        log.close()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: Optional[int] = None) -> None:
    """Writes ``data`` to a temporary file beside ``path``, fsyncs it and renames it over ``path``.

    A reader (or a crash) sees the old file or the new one, never half of one; a full disk
    leaves the old one and no temporary file, and raises ``DiskFullError``.

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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_no_space(err):
            raise DiskFullError(no_space_message(target, len(data))) from None
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
