from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.env import RankInfo, inside_slurm_allocation, rank_info, started_by_torchrun

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.parametrize("environ,expected", [
    ({}, RankInfo(0, 0, 1, 1, "none")),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "8",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, RankInfo(5, 1, 8, 4, "OMPI")),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4"}, RankInfo(3, 3, 4, 4, "PMI")),
    ({"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)"},
     RankInfo(6, 2, 8, 4, "SLURM")),
    # mpiexec inside an allocation: MPI's own variables win over SLURM's batch-step ones.
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
      "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, RankInfo(1, 1, 2, 2, "PMI")),
    # No local variables: local rank = rank, one node.
    ({"PMI_RANK": "2", "PMI_SIZE": "4"}, RankInfo(2, 2, 4, 4, "PMI")),
    # srun --mpi=pmi2 across nodes (what the second of 2 nodes saw): SLURM's task variables give
    # the local rank and count on this node.
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
      "SLURM_NTASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, RankInfo(2, 0, 4, 2, "PMI")),
    ({"PMI_RANK": "4", "PMI_SIZE": "5", "SLURM_PROCID": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
      "SLURM_NTASKS": "5", "SLURM_TASKS_PER_NODE": "3,2"}, RankInfo(4, 1, 5, 2, "PMI")),
])
def test_rank_info_reads_each_launchers_variables(environ, expected):
    assert rank_info(environ) == expected


def test_slurm_allocation_is_recognised_by_its_job_id():
    assert inside_slurm_allocation({"SLURM_JOB_ID": "12"})
    assert not inside_slurm_allocation({"PMI_RANK": "0"})


def test_torchrun_variables_come_first_and_need_its_rendezvous_address():
    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    # torchrun started by srun, one per node: SLURM's per-node task variables are not the rank.
    info = rank_info({**torchrun, "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert (info.rank, info.local_rank, info.world_size, info.local_size, info.source) == (3, 1, 4, 2, "torchrun")
    assert info.torchrun and started_by_torchrun(torchrun)
    # RANK alone is too common a name to mean a job.
    assert rank_info({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == RankInfo()
    assert not started_by_torchrun({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})


@pytest.mark.parametrize("text,node,expected", [("2(x2)", 1, 2), ("3,2", 0, 3), ("4(x2),1", 2, 1),
                                                ("2(x2)", 2, None), ("", 0, None), ("x", 0, None)])
def test_tasks_on_node_reads_slurms_compressed_counts(text, node, expected):
    from launcher.env import tasks_on_node

    assert tasks_on_node(text, node) == expected


def test_threads_per_rank_share_the_cores_this_process_may_use():
    from launcher.env import threads_per_rank, usable_cores

    assert usable_cores() == len(os.sched_getaffinity(0))
    assert threads_per_rank(None, 1, cores=8) == 8 and threads_per_rank(None, 4, cores=8) == 2
    assert threads_per_rank(None, 3, cores=2) == 1  # never 0
    assert threads_per_rank(3, 4, cores=8) == 3  # trainer.num_threads wins


def test_kfac_py_sets_passive_openmp_waits_before_torch_unless_the_user_chose():
    code = ("import os, runpy, sys; sys.argv = ['kfac.py', '--help']; runpy.run_path("
            f"{str(ROOT / 'kfac.py')!r}, run_name='__main__'); "
            "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    for given, expected in ((None, "PASSIVE False"), ("active", "active False")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert out.stdout.splitlines()[-1] == expected, out.stderr
