"""Real MPI ranks: 2, 3 and 4 ranks give 1 rank's weights, with even shares of every batch or
uneven ones; a failing rank ends the job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher.commands import mpiexec_flags
from launcher.launch import local_mpi_flavor

ROOT = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable
MPIEXEC = str(Path(PYTHON).parent / "mpiexec")
# Whatever MPI the venv holds: Open MPI needs leave to oversubscribe the cores and to run as root.
FLAGS = mpiexec_flags(local_mpi_flavor(MPIEXEC)) if os.access(MPIEXEC, os.X_OK) else []
STRATEGIES = ["all", "each", "root", "balanced"]
# 10 K-FAC steps in float64 on a fixed slice of real MNIST.
COMMON = ["trainer.epochs=1", "trainer.mini_batch_size=100", "data.max_train_samples=1000",
          "data.max_test_samples=100", "trainer.dtype=float64", "kfac.enabled=true",
          "optimizer=sgd", "optimizer.learning_rate=0.1", "kfac.damping_act=[0.01]", "kfac.damping_err=[1.0]",
          "kfac.inverse_dtype=float64", "trainer.flush_denormal=false"]

pytestmark = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK), reason="needs the venv's mpiexec")


def run_job(ranks: int, out: Path, overrides: list[str], strategies: list[str]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [PYTHON, str(ROOT / "tests/trainer/rank_job.py"), str(out), *overrides,
           "strategies=" + ",".join(strategies)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *FLAGS, PYTHON, "-m", "mpi4py", *cmd[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


@pytest.mark.parametrize("model", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_four_and_two_ranks_give_one_ranks_weights_for_every_owner_strategy(model, tmp_path):
    overrides = [f"model={model}", *COMMON]
    run_job(1, tmp_path / "r1", overrides, ["all"])
    reference = torch.load(tmp_path / "r1" / "all.pt")
    for ranks in (2, 4):
        run_job(ranks, tmp_path / f"r{ranks}", overrides, STRATEGIES if ranks == 4 else ["balanced"])
        for strategy in STRATEGIES if ranks == 4 else ["balanced"]:
            weights = torch.load(tmp_path / f"r{ranks}" / f"{strategy}.pt")
            assert max_relative_difference(weights, reference) < 1e-5, (ranks, strategy)
            # The run moved the weights, so the comparison is not vacuous.
    torch.manual_seed(42)
    from models import build_model

    initial = {n: p.detach().double() for n, p in build_model(model).named_parameters()}
    assert max_relative_difference(initial, reference) > 1e-3


def test_uneven_shares_on_three_and_four_ranks_give_one_ranks_weights(tmp_path):
    """The LBANN README's K-FAC recipe at global batch 100 on 1030 samples: 3 ranks hold 34, 33, 33
    of each full batch, 4 ranks 25 each and 8, 8, 7, 7 of the last one (30); the test set
    (130) splits unevenly too. One epoch in float64 (docs/algorithm.md §6)."""
    overrides = ["experiment=kfac_mlp", "trainer.epochs=1", "trainer.mini_batch_size=100",
                 "data.max_train_samples=1030", "data.max_test_samples=130", "trainer.dtype=float64",
                 "kfac.inverse_dtype=float64", "trainer.flush_denormal=false"]
    logs = {ranks: run_job(ranks, tmp_path / f"r{ranks}", overrides, ["balanced"]) for ranks in (1, 3, 4)}
    reference = torch.load(tmp_path / "r1" / "balanced.pt")
    worst = {ranks: max_relative_difference(torch.load(tmp_path / f"r{ranks}" / "balanced.pt"), reference)
             for ranks in (3, 4)}
    print(f"max relative weight difference from 1 rank: {worst}")
    assert max(worst.values()) < 1e-9, worst
    assert "local MB = [  33/   0/  33]  local last MB = [  10+0/   0+0/  10+0]" in logs[3]
    assert "local MB = [  25/   0/  25]  local last MB = [   7+2/   0+0/   7+2]" in logs[4]
    assert "iter/epoch = [11/0/2]" in logs[4]
    test_lines = {ranks: [line for line in log.splitlines() if line.startswith("model0 (instance 0) test")]
                  for ranks, log in logs.items()}
    assert len(test_lines[1]) == 2 and test_lines[3][-1] == test_lines[4][-1] == test_lines[1][-1]


def test_skip_weight_grad_on_four_ranks_gives_one_ranks_plain_weights(tmp_path):
    """The trainer path: ip1 and ip2 leave the gradient all-reduce; K-FAC writes their gradients."""
    overrides = ["model=mlp", *COMMON]
    run_job(1, tmp_path / "r1", overrides, ["all"])
    run_job(4, tmp_path / "r4", [*overrides, "kfac.skip_weight_grad=true"], ["balanced"])
    reference = torch.load(tmp_path / "r1" / "all.pt")
    assert max_relative_difference(torch.load(tmp_path / "r4" / "balanced.pt"), reference) < 1e-5


@pytest.mark.parametrize("backend", ["mpi", "gloo"])
def test_adam_two_ranks_equal_one_rank_with_each_cpu_backend(backend, tmp_path):
    overrides = ["model=mlp", "optimizer=adam", "trainer.epochs=1", "data.max_train_samples=1000",
                 "data.max_test_samples=100", "trainer.dtype=float64"]
    run_job(1, tmp_path / "r1", overrides, ["all"])
    run_job(2, tmp_path / "r2", [*overrides, f"trainer.backend={backend}"], ["all"])
    a, b = torch.load(tmp_path / "r1" / "all.pt"), torch.load(tmp_path / "r2" / "all.pt")
    assert max_relative_difference(b, a) < 1e-9


def test_a_rank_that_raises_ends_the_job_with_its_message():
    program = ("import sys, time\nfrom launcher.env import rank_info\nimport os\n"
               "from trainer.ranks.distributed import make_communicator\nimport torch\n"
               "comm = make_communicator(rank_info(os.environ))\n"
               "if comm.rank == 1:\n    time.sleep(0.5)\n    raise ValueError('rank 1 broke on purpose')\n"
               "comm.allreduce_sum_([torch.ones(3)])\n")
    start = time.time()
    result = subprocess.run([MPIEXEC, "-n", "2", *FLAGS, PYTHON, "-m", "mpi4py", "-c", program], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode != 0
    assert "rank 1 broke on purpose" in result.stderr
    assert time.time() - start < 60


def test_a_killed_rank_ends_the_whole_job_within_seconds(tmp_path):
    cmd = [PYTHON, str(ROOT / "kfac.py"), "--procs-per-node", "2", "--num_epochs", "50",
           "data.max_train_samples=20000", f"launcher.experiment_dir={tmp_path}"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                           start_new_session=True)
    try:
        victim = None
        deadline = time.time() + 120
        while victim is None and time.time() < deadline:
            time.sleep(1)
            # The ranks run in sessions of their own; this run's experiment dir names them.
            pattern = f"^{re.escape(PYTHON)} -m mpi4py .*experiment_dir={re.escape(str(tmp_path))}"
            out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
            # Wait for both ranks to be training (past start-up) before killing one.
            if len(out) == 2 and list(tmp_path.glob("*/")):
                time.sleep(5)
                victim = int(out[-1])
        assert victim, "the ranks did not start"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        job.wait(timeout=60)
        assert time.time() - killed_at < 30
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
