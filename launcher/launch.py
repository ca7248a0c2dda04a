"""Starting the ranks of a run from outside a job: the I/O edge of the launcher.

Decides (once, here, not while rendering) whether ``srun`` or ``mpiexec`` starts the ranks,
runs them with the canonical overrides, and returns their exit status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

from launcher.commands import mpiexec_argv, srun_argv
from launcher.config import LauncherConfig
from launcher.env import LAUNCHED, inside_slurm_allocation


class LaunchError(RuntimeError):
    """The ranks could not be started; the message says what to install or change."""


def choose_scheduler(cfg: LauncherConfig, environ: Mapping[str, str]) -> str:
    """``auto``: srun inside a SLURM allocation, else mpiexec (``local``: this process)."""
    if cfg.scheduler != "auto":
        return cfg.scheduler
    return "slurm" if inside_slurm_allocation(environ) else "mpiexec"


def mpi_flavor(mpiexec: str) -> str:
    """``openmpi`` or ``mpich``, from ``mpiexec --version``."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "mpich"
    return "openmpi" if "Open MPI" in out or "OpenRTE" in out else "mpich"


def find_mpiexec() -> str:
    """The mpiexec beside this Python (the venv's MPI wheel) or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if not found:
        raise LaunchError("several ranks need mpiexec, and none is on PATH: install an MPI "
                          "(pip install mpich, or your cluster's module) or run with --procs-per-node 1")
    return found


def launch_argv(cfg: LauncherConfig, script: str, overrides: Sequence[str],
                environ: Mapping[str, str]) -> list[str]:
    """The argv that starts every rank of this run."""
    scheduler = choose_scheduler(cfg, environ)
    if scheduler == "slurm":
        if not shutil.which("srun"):
            raise LaunchError("launcher.scheduler=slurm, but srun is not on PATH")
        return srun_argv(cfg, sys.executable, script, overrides)
    if cfg.nodes > 1:
        raise LaunchError(f"--nodes {cfg.nodes} needs a scheduler: run inside a SLURM allocation "
                          "or submit with --batch-job")
    mpiexec = find_mpiexec()
    return mpiexec_argv(cfg, sys.executable, script, overrides, mpiexec, mpi_flavor(mpiexec))


def run_ranks(argv: Sequence[str]) -> int:
    """Runs the ranks in the foreground; their output is this process's output."""
    env = dict(os.environ, **{LAUNCHED: "1"})
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    print("$ " + " ".join(argv), flush=True)
    try:
        return subprocess.run(list(argv), env=env).returncode
    except KeyboardInterrupt:
        return 130
