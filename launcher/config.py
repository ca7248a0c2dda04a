"""The launcher group of the config: how many ranks, and the scheduler's fields."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

SCHEDULERS = ("auto", "local", "mpiexec", "slurm")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_groups(config_dirs: Sequence[str] = ()) -> tuple[str, ...]:
    """The config groups: the folders of ``configs/`` (and of any ``--config-dir``), sorted."""
    return tuple(sorted({d for folder in (CONFIG_DIR, *config_dirs) if os.path.isdir(folder)
                         for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))}))


def group_options(group: str, config_dirs: Sequence[str] = ()) -> tuple[str, ...]:
    """The options of a config group: the names of its ``configs/<group>/*.yaml`` files, sorted.

    The files are the one home of the choices (``--model``, ``--optimizer``, ``experiment=``).

    Args:
        group: The group's folder name, e.g. ``model``.
        config_dirs: Further config folders (``--config-dir``) searched after ``configs/``.
    """
    folders = [os.path.join(d, group) for d in (CONFIG_DIR, *config_dirs)]
    return tuple(sorted({f[:-5] for d in folders if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".yaml")}))


def requeue_without_slurm(requeue: bool, scheduler: str) -> bool:
    """The requeue rule, the one place it is stated: a requeuing run must be started by SLURM.

    Args:
        requeue: ``launcher.requeue``.
        scheduler: ``launcher.scheduler`` as configured (``auto`` may still become SLURM), or the
            scheduler a run was resolved to.

    Returns:
        True when ``requeue`` is set and ``scheduler`` can never be SLURM.
    """
    return requeue and scheduler not in ("auto", "slurm")


@dataclass
class LauncherConfig:
    """Where and how the ranks of a run are started."""

    scheduler: str = "auto"
    nodes: int = 1
    procs_per_node: int = 1
    partition: Optional[str] = None
    account: Optional[str] = None
    reservation: Optional[str] = None
    time_limit: Optional[int] = None  # minutes
    job_name: str = "kfac"
    setup_only: bool = False
    batch_job: bool = False
    experiment_dir: str = "experiments"
    requeue: bool = False  # SLURM: a job stopped by a signal requeues itself and resumes
    signal_seconds: int = 120  # SLURM: USR1 this long before the time limit (0: none)


def validate_launcher(cfg: LauncherConfig) -> list[str]:
    """Returns one message per invalid field, each naming its key."""
    errors = []
    if cfg.scheduler not in SCHEDULERS:
        errors.append(f"launcher.scheduler: {cfg.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    for key in ("nodes", "procs_per_node"):
        if getattr(cfg, key) < 1:
            errors.append(f"launcher.{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.time_limit is not None and cfg.time_limit < 1:
        errors.append(f"launcher.time_limit: must be >= 1 minute, got {cfg.time_limit}")
    if cfg.signal_seconds < 0:
        errors.append(f"launcher.signal_seconds: must be >= 0 (0: no signal), got {cfg.signal_seconds}")
    if requeue_without_slurm(cfg.requeue, cfg.scheduler):
        errors.append(f"launcher.requeue: needs SLURM, but launcher.scheduler={cfg.scheduler} "
                      "(use launcher=slurm or --batch-job)")
    if not cfg.job_name or "/" in cfg.job_name:
        errors.append(f"launcher.job_name: must be a non-empty name without '/', got {cfg.job_name!r}")
    return errors
