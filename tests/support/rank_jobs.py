"""Real MPI jobs of tests/trainer/rank_job.py: their command lines, and the weights they leave.

``start`` queues a job on a ``Jobs`` (independent jobs run side by side); ``log_of`` awaits it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from launcher.commands import mpiexec_flags
from launcher.launch import local_mpi_flavor
from tests.support.jobs import Jobs

ROOT = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable
MPIEXEC = str(Path(PYTHON).parent / "mpiexec")
HAVE_MPIEXEC = os.access(MPIEXEC, os.X_OK)
# Whatever MPI the venv holds: Open MPI needs leave to oversubscribe the cores and to run as root.
FLAGS = mpiexec_flags(local_mpi_flavor(MPIEXEC)) if HAVE_MPIEXEC else []
# 10 K-FAC steps in float64 on a fixed slice of real MNIST.
COMMON = ["trainer.epochs=1", "trainer.mini_batch_size=100", "data.max_train_samples=1000",
          "data.max_test_samples=100", "trainer.dtype=float64", "kfac.enabled=true",
          "optimizer=sgd", "optimizer.learning_rate=0.1", "kfac.damping_act=[0.01]", "kfac.damping_err=[1.0]",
          "kfac.inverse_dtype=float64", "trainer.flush_denormal=false"]


def job_argv(ranks: int, out: Path, overrides: list[str], strategies: list[str]) -> list[str]:
    """rank_job.py on ``ranks`` ranks (plain Python for one), writing ``out/<strategy>.pt``."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [PYTHON, str(ROOT / "tests/trainer/rank_job.py"), str(out), *overrides, "strategies=" + ",".join(strategies)]
    return [MPIEXEC, "-n", str(ranks), *FLAGS, PYTHON, "-m", "mpi4py", *cmd[1:]] if ranks > 1 else cmd


def start(jobs: Jobs, out: Path, ranks: int, overrides: list[str], strategies: list[str]) -> None:
    """Queues a job named after its folder, ``out``."""
    jobs.start(str(out), job_argv(ranks, out, overrides, strategies), timeout=600, cwd=ROOT,
               env=dict(os.environ, OMP_NUM_THREADS="1"))


def log_of(jobs: Jobs, out: Path) -> str:
    """The job's stdout, once it has ended with status 0."""
    result = jobs.result(str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)
