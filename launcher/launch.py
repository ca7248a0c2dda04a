"""Starting a run from outside a job: the I/O edge of the launcher.

Every run gets a work dir holding ``batch.sh``, ``config.yaml``, ``out.log``, ``err.log`` and
``metrics.jsonl``. Then, by the config:

- ``--setup-only``: stop there;
- ``--batch-job``: submit ``batch.sh`` with sbatch and print the job id;
- otherwise: one rank trains in this process (its output tee'd to the logs), several ranks
  run ``batch.sh`` (mpiexec or srun) with their output tee'd to the logs.

What starts the ranks is decided once, here, before anything is rendered.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

from launcher.batch import BatchSpec, SubmitError, render_batch_script, run_batch_script, submit, write_work_dir
from launcher.commands import script_argv
from launcher.config import LauncherConfig, requeue_without_slurm
from launcher.env import LAUNCHED, inside_slurm_allocation
from launcher.workdir import ERR_LOG, JOB_ID_FILE, OUT_LOG, SCRIPT_NAME, AppendLog, DiskFullError, atomic_write_text


class LaunchError(RuntimeError):
    """The run cannot be started as configured; the message says what to change."""


def choose_scheduler(cfg: LauncherConfig, environ: Mapping[str, str]) -> str:
    """``auto``: SLURM for batch jobs and inside an allocation, else mpiexec.

    Raises:
        LaunchError: for combinations that cannot work (several nodes without SLURM, ...).
    """
    scheduler = cfg.scheduler
    if scheduler == "auto":
        scheduler = "slurm" if cfg.batch_job or inside_slurm_allocation(environ) else "mpiexec"
    ranks = cfg.nodes * cfg.procs_per_node
    if cfg.batch_job and scheduler != "slurm":
        raise LaunchError(f"--batch-job submits with sbatch, but launcher.scheduler={scheduler}: "
                          "use launcher=slurm or launcher=auto")
    if scheduler == "local" and ranks > 1:
        raise LaunchError(f"launcher.scheduler=local runs one rank in this process, but {ranks} ranks were "
                          "asked for: use launcher=mpiexec or launcher=slurm")
    if scheduler in ("mpiexec", "local") and cfg.nodes > 1:
        raise LaunchError(f"--nodes {cfg.nodes} needs SLURM: run inside an allocation (salloc) or add --batch-job")
    return scheduler


def mpi_flavor(mpiexec: str) -> str:
    """``openmpi`` or ``mpich``, from ``mpiexec --version``."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "mpich"
    return "openmpi" if "Open MPI" in out or "OpenRTE" in out else "mpich"


def local_mpi_flavor(mpiexec: str) -> str:
    """``mpi_flavor``, as ``openmpi-as-root`` for Open MPI run by root (it refuses root unasked,
    and containers often run as root)."""
    flavor = mpi_flavor(mpiexec)
    if flavor == "openmpi" and hasattr(os, "geteuid") and os.geteuid() == 0:
        return "openmpi-as-root"
    return flavor


def find_mpiexec() -> str:
    """The mpiexec beside this Python (the venv's MPI wheel), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if not found:
        raise LaunchError("several ranks need mpiexec, and none is on PATH: install an MPI "
                          "(pip install mpich, or load your cluster's module) or use --procs-per-node 1")
    return found


@dataclass(frozen=True)
class Run:
    """One run to start: its config slice, work dir and the overrides every rank gets."""

    launcher: LauncherConfig
    work_dir: Path
    overrides: Sequence[str]
    config_yaml: str
    script: str  # absolute path of kfac.py


def batch_spec(run: Run, scheduler: str, python: str, mpiexec: str = "mpiexec", flavor: str = "mpich") -> BatchSpec:
    """The batch script of a run (pure)."""
    cfg = run.launcher
    # Every rank writes into this run's work dir and makes no Hydra dir of its own.
    # --setup-only and --batch-job were for this process; the ranks just train.
    kept = [o for o in run.overrides if not o.lstrip("+").startswith(("launcher.setup_only=", "launcher.batch_job="))]
    overrides = [*kept, f"hydra.run.dir={run.work_dir}", "hydra.output_subdir=null"]
    argv = script_argv(cfg, scheduler, python, run.script, overrides, mpiexec, flavor)
    signal = None
    if scheduler == "slurm" and cfg.time_limit is not None and cfg.signal_seconds > 0:
        # Never more than half the limit, so a short job is not signalled as it starts.
        signal = f"USR1@{min(cfg.signal_seconds, cfg.time_limit * 30)}"
    return BatchSpec(
        scheduler="slurm" if scheduler == "slurm" else "mpiexec", nodes=cfg.nodes, ntasks_per_node=cfg.procs_per_node,
        job_name=cfg.job_name, work_dir=str(run.work_dir), launch_argv=argv, time_limit_minutes=cfg.time_limit,
        partition=cfg.partition, account=cfg.account, reservation=cfg.reservation,
        env={LAUNCHED: "1", "PYTHONUNBUFFERED": "1"}, signal=signal, requeue=cfg.requeue and scheduler == "slurm")


@contextmanager
def tee_output(work_dir: Path) -> Iterator[None]:
    """Copies this process's stdout and stderr into the work dir's out.log and err.log.

    Each write reaches the log whole or not at all (``AppendLog``): a full disk raises
    ``DiskFullError`` once and leaves no torn line; the terminal still gets everything.
    """

    class Tee:
        def __init__(self, stream: TextIO, log: AppendLog) -> None:
            self.stream, self.log = stream, log

        def write(self, text: str) -> int:
            written = self.stream.write(text)
            self.log.write(text)
            return written

        def flush(self) -> None:
            self.stream.flush()

        def isatty(self) -> bool:
            return self.stream.isatty()

        def __getattr__(self, name: str) -> object:
            return getattr(self.stream, name)

    out, err = AppendLog(work_dir / OUT_LOG), AppendLog(work_dir / ERR_LOG)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(sys.stdout, out), Tee(sys.stderr, err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        sys.stdout.flush()
        sys.stderr.flush()
        out.close()
        err.close()


def start(run: Run, train_here: Callable[[Path], None], environ: Optional[Mapping[str, str]] = None) -> int:
    """Writes the work dir, then stops, submits, trains here, or runs the ranks; returns a status."""
    environ = os.environ if environ is None else environ
    cfg = run.launcher
    scheduler = choose_scheduler(cfg, environ)
    ranks = cfg.nodes * cfg.procs_per_node
    mpiexec, flavor = "mpiexec", "mpich"
    if scheduler == "mpiexec" and ranks > 1:
        try:
            mpiexec = find_mpiexec()
            flavor = local_mpi_flavor(mpiexec)
        except LaunchError:
            if not cfg.setup_only:  # a script to look at or copy needs no MPI here
                raise
    if requeue_without_slurm(cfg.requeue, scheduler):
        raise LaunchError(f"launcher.requeue needs SLURM, but this run uses {scheduler}: add --batch-job "
                          "or use launcher=slurm")
    # Writing a script needs nothing; running it needs srun, checked before any work dir
    # exists (submit() checks for sbatch, and a job never submitted leaves no work dir).
    if not cfg.setup_only and scheduler == "slurm" and not cfg.batch_job and not shutil.which("srun", path=environ.get("PATH")):
        raise LaunchError("launcher.scheduler=slurm runs the ranks with srun, which is not on PATH; "
                          "--setup-only writes the script without running it")
    spec = batch_spec(run, scheduler, sys.executable, mpiexec, flavor)
    existed = run.work_dir.exists()
    try:
        write_work_dir(run.work_dir, render_batch_script(spec), run.config_yaml)
    except DiskFullError:
        if not existed:  # no half-made work dir is left behind
            shutil.rmtree(run.work_dir, ignore_errors=True)
        raise
    if not cfg.batch_job or cfg.setup_only:
        print(f"work dir: {run.work_dir}", flush=True)
    if cfg.setup_only:
        runner = "sbatch" if spec.scheduler == "slurm" else "bash"
        print(f"setup only: run it with  {runner} {run.work_dir / SCRIPT_NAME}", flush=True)
        return 0
    if cfg.batch_job:
        try:
            job_id = submit(run.work_dir)
        except SubmitError:
            if not existed:  # a job that was never submitted leaves no work dir behind
                shutil.rmtree(run.work_dir, ignore_errors=True)
            raise
        print(f"work dir: {run.work_dir}", flush=True)
        atomic_write_text(run.work_dir / JOB_ID_FILE, job_id + "\n")
        print(f"submitted batch job {job_id}", flush=True)
        return 0
    if ranks == 1 and scheduler != "slurm":
        with tee_output(run.work_dir):
            train_here(run.work_dir)
        return 0
    return run_batch_script(run.work_dir)
