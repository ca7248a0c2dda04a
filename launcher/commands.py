"""The argv that starts the ranks: ``mpiexec`` locally, ``srun`` inside a SLURM allocation.

Pure: the caller passes the config, the Python to run and the canonical overrides.
Every rank runs ``python -m mpi4py kfac.py ...`` so that an exception in one rank aborts
the whole job instead of leaving the others hanging in a collective.
"""

from __future__ import annotations

from collections.abc import Sequence

from launcher.config import LauncherConfig


def rank_command(python: str, script: str, overrides: Sequence[str], ranks: int) -> list[str]:
    """What each rank runs; a single rank needs no MPI at all."""
    if ranks == 1:
        return [python, script, *overrides]
    return [python, "-m", "mpi4py", script, *overrides]


def mpiexec_argv(cfg: LauncherConfig, python: str, script: str, overrides: Sequence[str],
                 mpiexec: str = "mpiexec", flavor: str = "mpich") -> list[str]:
    """``mpiexec -n N ...`` for one node.

    ``flavor``: ``mpich``, ``openmpi`` (needs leave to oversubscribe cores), or
    ``openmpi-as-root`` (also leave to run as root, which Open MPI otherwise refuses).
    """
    ranks = cfg.nodes * cfg.procs_per_node
    return [mpiexec, "-n", str(ranks), *mpiexec_flags(flavor), *rank_command(python, script, overrides, ranks)]


def mpiexec_flags(flavor: str) -> list[str]:
    """The leave Open MPI needs (see ``mpiexec_argv``); MPICH needs none."""
    if not flavor.startswith("openmpi"):
        return []
    return ["--oversubscribe", *(["--allow-run-as-root"] if flavor == "openmpi-as-root" else [])]


def srun_argv(cfg: LauncherConfig, python: str, script: str, overrides: Sequence[str]) -> list[str]:
    """``srun`` with the job's geometry, inside an allocation or a batch script."""
    ranks = cfg.nodes * cfg.procs_per_node
    # --mpi=pmi2: without it, SLURMs configured with MpiDefault=none start N separate
    # one-rank MPI worlds (MPICH's PMI client needs SLURM's pmi2 plugin).
    # --kill-on-bad-exit: a rank that fails ends the step, instead of leaving the others
    # waiting in a collective until the time limit.
    return ["srun", "--mpi=pmi2", "--kill-on-bad-exit=1",
            f"--nodes={cfg.nodes}", f"--ntasks={ranks}", f"--ntasks-per-node={cfg.procs_per_node}",
            *rank_command(python, script, overrides, ranks)]


def script_argv(cfg: LauncherConfig, scheduler: str, python: str, script: str, overrides: Sequence[str],
                mpiexec: str = "mpiexec", flavor: str = "mpich") -> list[str]:
    """The command a run's batch.sh executes: srun, mpiexec, or plain python for one rank."""
    ranks = cfg.nodes * cfg.procs_per_node
    if scheduler == "slurm":
        return srun_argv(cfg, python, script, overrides)
    if ranks == 1:
        return rank_command(python, script, overrides, 1)
    return mpiexec_argv(cfg, python, script, overrides, mpiexec, flavor)
