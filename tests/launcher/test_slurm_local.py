"""The private local SLURM, and batch scripts submitted to it for real (skipped where SLURM is missing)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from launcher.batch import BatchSpec, render_batch_script, submit, write_work_dir
from launcher.cluster.slurm_conf import SlurmPaths, daemon_argvs, render_slurm_conf
from launcher.cluster.slurm_daemons import LocalSlurm, missing_programs

# Rank 0 alone prints what an allgather brought: the ranks' output streams interleave mid-line.
MPI_HELLO = ("from mpi4py import MPI; c = MPI.COMM_WORLD; r = c.allgather(c.Get_rank()); "
             "c.Get_rank() == 0 and print(r, c.Get_size())")


def test_slurm_conf_text():
    paths = SlurmPaths(Path("/r"))
    assert render_slurm_conf(paths, "node1", 7001, 7002, cpus=4, real_memory_mb=1000) == """\
# A private one-node SLURM for tests, written by launcher.slurm_local.
ClusterName=kfactest
SlurmctldHost=node1(127.0.0.1)
SlurmctldPort=7001
SlurmdPort=7002
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=/r/run/munge.sock
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=600
StateSaveLocation=/r/state
SlurmdSpoolDir=/r/spool
SlurmctldPidFile=/r/run/slurmctld.pid
SlurmdPidFile=/r/run/slurmd.pid
SlurmctldLogFile=/r/log/slurmctld.log
SlurmdLogFile=/r/log/slurmd.log
NodeName=node1 NodeAddr=127.0.0.1 CPUs=4 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node1 Default=YES MaxTime=INFINITE State=UP
"""


def test_daemon_argvs():
    argvs = daemon_argvs(SlurmPaths(Path("/r")), {"munged": "M", "slurmctld": "C", "slurmd": "D"}, "node1")
    assert list(argvs) == ["munged", "slurmctld", "slurmd"]
    assert argvs["munged"] == ["M", "--foreground", "--socket=/r/run/munge.sock", "--key-file=/r/munge/munge.key",
                               "--pid-file=/r/run/munged.pid", "--seed-file=/r/munge/munged.seed",
                               "--log-file=/r/log/munged.log"]
    assert argvs["slurmctld"] == ["C", "-D", "-f", "/r/slurm.conf"]
    assert argvs["slurmd"] == ["D", "-D", "-f", "/r/slurm.conf", "-N", "node1"]


needs_slurm = pytest.mark.skipif(bool(missing_programs()) or os.geteuid() != 0,
                                 reason="needs root and SLURM + munge (.ci/install-slurm)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def slurm(slurm_conf):
    return slurm_conf  # the package's cluster (tests/launcher/conftest.py), SLURM_CONF exported


def _run_job(slurm: LocalSlurm, tmp_path: Path, argv: list[str], ntasks: int = 2) -> list[str]:
    """Renders, writes and submits a batch script; waits for it; returns the lines the launch printed."""
    work_dir = tmp_path / "job"
    spec = BatchSpec(scheduler="slurm", nodes=1, ntasks_per_node=ntasks, job_name="t", work_dir=str(work_dir),
                     time_limit_minutes=5, launch_argv=argv)
    write_work_dir(work_dir, render_batch_script(spec), "{}\n")
    job_id = submit(work_dir)
    state = slurm.wait_for_job(job_id, timeout_s=60)
    out = (work_dir / "out.log").read_text().splitlines()
    err = (work_dir / "err.log").read_text()
    assert state == "COMPLETED", f"{state}\n{out}\n{err}"
    assert out[0].startswith("Started at ") and out[-1].endswith("with status 0"), out
    return out[1:-1]


@needs_slurm
def test_start_and_stop_by_pid():
    cluster = LocalSlurm()
    with cluster:
        assert os.environ["SLURM_CONF"] == str(cluster.paths.conf)
        assert cluster.node_state() == "idle"
        pids = dict(cluster.pids)
        root = cluster.paths.root
        assert sorted(pids) == ["munged", "slurmctld", "slurmd"]
        assert all(_alive(pid) for pid in pids.values())
    assert not any(_alive(pid) for pid in pids.values())
    assert not root.exists()
    assert "SLURM_CONF" not in os.environ or os.environ["SLURM_CONF"] != str(root / "slurm.conf")


@needs_slurm
def test_sbatch_srun_two_tasks(slurm, tmp_path):
    lines = _run_job(slurm, tmp_path, ["srun", "-n", "2", "hostname"])
    assert lines == [socket.gethostname()] * 2


@needs_slurm
def test_srun_pmi2_forms_one_mpi_world(slurm, tmp_path):
    pytest.importorskip("mpi4py")
    lines = _run_job(slurm, tmp_path, ["srun", "--mpi=pmi2", "-n", "2", sys.executable, "-m", "mpi4py", "-c", MPI_HELLO])
    assert lines == ["[0, 1] 2"]


@needs_slurm
def test_mpiexec_inside_the_allocation_forms_one_mpi_world(slurm, tmp_path):
    pytest.importorskip("mpi4py")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.access(mpiexec, os.X_OK):
        pytest.skip("no mpiexec beside this Python")
    lines = _run_job(slurm, tmp_path, [mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", "-c", MPI_HELLO])
    assert lines == ["[0, 1] 2"]
