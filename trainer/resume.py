"""Where a run resumes from: ``trainer.resume`` → the newest intact checkpoint it names.

- ``resume_candidates``: the value (a file, a work dir, ``latest`` or ``auto``) → every
  checkpoint it may mean, newest first.
- ``resolve_resume``: the first of them (what the value names, before anything is read).
- ``newest_intact``: the first of them that loads; a damaged or truncated one (a node lost
  mid-write on a file system without atomic rename, a disk that filled) is passed over and
  named, never silently. A file the user named is not replaced: it is refused, and the line
  names the newest intact checkpoint beside it.
- ``checked_resume``: the one resume rule, for the launching process and for each rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from launcher.workdir import parse_work_dir_name
from trainer.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    check_compatible,
    list_checkpoints,
    load_checkpoint,
    model_shapes,
    run_identity,
)


@dataclass(frozen=True)
class Candidates:
    """The checkpoints a ``trainer.resume`` value may mean, newest first.

    Attributes:
        value: The value as given (for the messages).
        files: Newest first.
        named: The user named one file: it is that file or nothing.
    """

    value: str
    files: list[Path]
    named: bool = False


@dataclass
class Resume:
    """The checkpoint a run continues from and the damaged ones passed over to get there."""

    path: Path
    state: dict[str, Any]
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # (file, load_checkpoint's line), newest first

    def note(self) -> Optional[str]:
        """One line naming the damaged checkpoints and the one used (None: nothing was passed over)."""
        if not self.damaged:
            return None
        names = ", ".join(str(path) if i == 0 else path.name for i, (path, _) in enumerate(self.damaged))
        reason = self.damaged[0][1].split(f"{self.damaged[0][0]} ", 1)[-1]  # the first one's, without its path
        return (f"passed over damaged checkpoint{'s' * (len(self.damaged) > 1)} {names} ({reason}); "
                f"resuming from {self.path}, the newest intact one")


def _newest_first(folder: Path) -> list[Path]:
    """A work dir's checkpoints (its ``checkpoints/`` folder, or the folder itself), newest step first."""
    return list(reversed(list_checkpoints(folder / CHECKPOINT_DIR) or list_checkpoints(folder)))


def resume_candidates(value: Optional[str], *, work_dir: Optional[str | os.PathLike[str]] = None,
                      experiment_dir: str | os.PathLike[str] = "experiments", job_name: str = "kfac",
                      prefer_work_dir: bool = False) -> Optional[Candidates]:
    """Every checkpoint ``trainer.resume`` may mean, newest first; ``None`` for a fresh start.

    Args:
        value: ``None``/``""`` (fresh), ``auto`` (this work dir's checkpoints, if any),
            ``latest`` (those of the experiment dir's work dirs of this job name, the work dir
            written last first), or a checkpoint file or a work dir (its checkpoints).
        work_dir: This run's work dir (for ``auto`` and ``prefer_work_dir``).
        experiment_dir: Where ``latest`` looks.
        job_name: Whose work dirs ``latest`` considers.
        prefer_work_dir: This work dir's checkpoints come before ``value``'s (a requeued job).

    Raises:
        CheckpointError: ``latest`` or a path that names no checkpoint.
    """
    own = [p.resolve() for p in _newest_first(Path(work_dir))] if (prefer_work_dir or value == "auto") and \
        work_dir is not None else []
    if value in (None, "", "auto"):
        return Candidates(str(value), own) if own else None
    if value == "latest":
        found = own + _latest(Path(experiment_dir), job_name)
        return Candidates(value, list(dict.fromkeys(found)))
    path = Path(value).expanduser()
    if path.is_dir():
        found = _newest_first(path)
        if not found:
            raise CheckpointError(f"trainer.resume={value}: no checkpoints in {path} (nor in {path / CHECKPOINT_DIR})")
        return Candidates(value, list(dict.fromkeys(own + [p.resolve() for p in found])))
    if not path.exists():
        raise CheckpointError(f"trainer.resume={value}: no such file or directory")
    if own:  # a requeued job: its own checkpoints first, then the file it began from
        return Candidates(value, list(dict.fromkeys([*own, path.resolve()])))
    return Candidates(value, [path.resolve()], named=True)


def resolve_resume(value: Optional[str], **where: Any) -> Optional[Path]:
    """The newest checkpoint ``trainer.resume`` names (``resume_candidates``' first), or ``None``."""
    found = resume_candidates(value, **where)
    return found.files[0].resolve() if found else None


def newest_intact(candidates: Candidates, device: str | torch.device = "cpu") -> Resume:
    """The newest candidate that loads; the damaged ones before it are named in ``Resume.damaged``.

    Raises:
        CheckpointError: A named file that does not load (the line names the newest intact one
            beside it, if any), or no candidate that loads.
    """
    damaged: list[str] = []
    for path in candidates.files:
        try:
            return Resume(path.resolve(), load_checkpoint(path, device), damaged)
        except CheckpointError as err:
            if candidates.named:
                raise CheckpointError(f"{err}{_intact_beside(path, device)}") from None
            damaged.append((path.resolve(), str(err)))
    raise CheckpointError(f"trainer.resume={candidates.value}: no intact checkpoint: {'; '.join(e for _, e in damaged)}")


def _intact_beside(path: Path, device: str | torch.device) -> str:
    for other in _newest_first(path.parent):
        if other.resolve() == path.resolve():
            continue
        try:
            load_checkpoint(other, device)
        except CheckpointError:
            continue
        return f"; the newest intact checkpoint beside it is {other.resolve()} (trainer.resume={path.parent})"
    return ""


def checked_resume(cfg: Any, build_model: Callable[[], torch.nn.Module], *, work_dir: Optional[str | os.PathLike[str]] = None,
                   device: str | torch.device = "cpu") -> Optional[Resume]:
    """The checkpoint this run resumes from, loaded and checked against the run's identity.

    The one resume rule, for the launching process (before any work dir exists, ``work_dir``
    ``None``) and for each rank (a requeued job prefers its own work dir's newest checkpoint).

    Args:
        cfg: The composed config (``trainer.resume``, ``launcher.*`` and the identity keys).
        build_model: Builds a model of this run's architecture (only its parameter shapes
            are read; called only when there is a checkpoint).

    Returns:
        The checkpoint, its state and the damaged ones passed over, or ``None`` for a fresh start.

    Raises:
        CheckpointError: For a checkpoint that cannot be found, read, or does not fit this run.
    """
    candidates = resume_candidates(cfg.trainer.resume, work_dir=work_dir, experiment_dir=cfg.launcher.experiment_dir,
                                   job_name=cfg.launcher.job_name, prefer_work_dir=bool(cfg.launcher.requeue))
    if candidates is None:
        return None
    found = newest_intact(candidates, device)
    check_compatible(found.state, run_identity(cfg, model_shapes(build_model())), found.path)
    return found


def _latest(experiment_dir: Path, job_name: str) -> list[Path]:
    """The checkpoints of this job's work dirs: the work dir with the newest file first, each newest step first."""
    runs = []
    if experiment_dir.is_dir():
        for run in experiment_dir.iterdir():
            parsed = parse_work_dir_name(run.name)
            if run.is_dir() and parsed is not None and parsed.job_name == job_name:
                found = _newest_first(run)
                if found:
                    runs.append((max(p.stat().st_mtime_ns for p in found), found))
    if not runs:
        raise CheckpointError(f"trainer.resume=latest: no checkpoints in the work dirs of job {job_name!r} "
                              f"under {experiment_dir}")
    return [p.resolve() for _, found in sorted(runs, key=lambda r: r[0], reverse=True) for p in found]
