"""The argv that starts the ranks (pure)."""

from __future__ import annotations

from launcher.commands import mpiexec_argv, rank_command, srun_argv
from launcher.config import LauncherConfig


def test_one_rank_needs_no_mpi() -> None:
    assert rank_command("py", "kfac.py", ["a=1"], 1) == ["py", "kfac.py", "a=1"]


def test_mpiexec_per_flavor() -> None:
    cfg = LauncherConfig(nodes=1, procs_per_node=4)
    tail = ["-n", "4"]
    body = ["py", "-m", "mpi4py", "kfac.py", "a=1"]
    assert mpiexec_argv(cfg, "py", "kfac.py", ["a=1"]) == ["mpiexec", *tail, *body]
    # Open MPI refuses more ranks than cores, and root, unless told.
    assert mpiexec_argv(cfg, "py", "kfac.py", ["a=1"], flavor="openmpi") == [
        "mpiexec", *tail, "--oversubscribe", *body]
    assert mpiexec_argv(cfg, "py", "kfac.py", ["a=1"], flavor="openmpi-as-root") == [
        "mpiexec", *tail, "--oversubscribe", "--allow-run-as-root", *body]


def test_srun_geometry() -> None:
    cfg = LauncherConfig(nodes=2, procs_per_node=2)
    assert srun_argv(cfg, "py", "kfac.py", []) == [
        "srun", "--mpi=pmi2", "--kill-on-bad-exit=1",
        "--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "py", "-m", "mpi4py", "kfac.py"]
