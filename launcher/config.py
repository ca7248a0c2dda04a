"""The launcher group of the config: how many ranks, and the scheduler's fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SCHEDULERS = ("auto", "local", "mpiexec", "slurm")


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
    if cfg.requeue and cfg.scheduler in ("local", "mpiexec"):
        errors.append(f"launcher.requeue: needs SLURM, but launcher.scheduler={cfg.scheduler} "
                      "(use launcher=slurm or --batch-job)")
    if not cfg.job_name or "/" in cfg.job_name:
        errors.append(f"launcher.job_name: must be a non-empty name without '/', got {cfg.job_name!r}")
    return errors
