"""Real MPI ranks: 2, 3 and 4 ranks give 1 rank's weights, with even shares of every batch or
uneven ones; a failing rank ends the job.

The equality jobs are independent: the module starts them together (``jobs``) and each test
checks the results it needs. The failure tests run after them, on a quiet machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.support.jobs import Jobs
from tests.support.rank_jobs import COMMON, FLAGS, HAVE_MPIEXEC, MPIEXEC, PYTHON, ROOT, log_of, max_relative_difference, start

STRATEGIES = ["all", "each", "root", "balanced"]

pytestmark = pytest.mark.skipif(not HAVE_MPIEXEC, reason="needs the venv's mpiexec")


# On real ranks by default: "all" (every rank inverts every factor, the costliest) on 2, "balanced"
# (the inverses split among the ranks) on 4; "each" and "root" on 4 in the slow set (every
# strategy against one rank by default: thread ranks in tests/kfac_callback/test_kfac_callback.py).
ON_RANKS = {2: ["all"], 4: ["balanced"]}
SLOW_ON_RANKS = {4: ["each", "root"]}


def start_strategy_jobs(jobs: Jobs, root: Path, model: str, on_ranks: dict[int, list[str]] = ON_RANKS) -> None:
    overrides = [f"model={model}", *COMMON]
    start(jobs, root / model / "r1", 1, overrides, ["all"])
    for ranks, strategies in on_ranks.items():
        start(jobs, root / model / f"r{ranks}", ranks, overrides, strategies)


UNEVEN = ["experiment=kfac_mlp", "trainer.epochs=1", "trainer.mini_batch_size=100",
          "data.max_train_samples=1030", "data.max_test_samples=130", "trainer.dtype=float64",
          "kfac.inverse_dtype=float64", "trainer.flush_denormal=false"]
ADAM = ["model=mlp", "optimizer=adam", "trainer.epochs=1", "data.max_train_samples=1000",
        "data.max_test_samples=100", "trainer.dtype=float64"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The default tests' jobs, started together (see tests/support/jobs.py); their folders by name."""
    root = tmp_path_factory.mktemp("ranks")
    jobs = Jobs(at_once=3, root=root)
    start_strategy_jobs(jobs, root, "mlp")
    for ranks in (1, 3):
        start(jobs, root / "uneven" / f"r{ranks}", ranks, UNEVEN, ["balanced"])
    start(jobs, root / "adam" / "r1", 1, ADAM, ["all"])
    for backend in ("mpi", "gloo"):
        start(jobs, root / "adam" / backend, 2, [*ADAM, f"trainer.backend={backend}"], ["all"])
    yield jobs
    jobs.close()


@pytest.mark.parametrize("model", ["mlp", pytest.param("cnn", marks=pytest.mark.slow),
                                   pytest.param("mlp-each-root", marks=pytest.mark.slow)])
def test_four_and_two_ranks_give_one_ranks_weights_for_every_owner_strategy(model, jobs, tmp_path):
    """The owner strategies on real ranks (all four on 4 ranks: tests/launcher/test_two_nodes.py, slow)."""
    on_ranks = SLOW_ON_RANKS if model == "mlp-each-root" else ON_RANKS
    model = model.split("-")[0]
    own = on_ranks is not ON_RANKS or model != "mlp"  # the module's jobs are the default run's
    if own:
        jobs = Jobs(at_once=3, root=tmp_path)
        start_strategy_jobs(jobs, tmp_path, model, on_ranks)
    root = jobs.root / model
    for ranks in (1, *on_ranks):
        log_of(jobs, root / f"r{ranks}")
    if own:
        jobs.close()
    reference = torch.load(root / "r1" / "all.pt")
    assert sorted(sum([*ON_RANKS.values(), *SLOW_ON_RANKS.values()], [])) == sorted(STRATEGIES)
    for ranks, strategies in on_ranks.items():
        for strategy in strategies:
            weights = torch.load(root / f"r{ranks}" / f"{strategy}.pt")
            assert max_relative_difference(weights, reference) < 1e-5, (ranks, strategy)
            # The run moved the weights, so the comparison is not vacuous.
    torch.manual_seed(42)
    from models import build_model

    initial = {n: p.detach().double() for n, p in build_model(model).named_parameters()}
    assert max_relative_difference(initial, reference) > 1e-3


@pytest.mark.parametrize("ranks", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_uneven_shares_on_three_and_four_ranks_give_one_ranks_weights(jobs, tmp_path, ranks):
    """The LBANN README's K-FAC recipe at global batch 100 on 1030 samples: 3 ranks hold 34, 33, 33
    of each full batch, 4 ranks 25 each and 8, 8, 7, 7 of the last one (30); the test set
    (130) splits unevenly too. One epoch in float64 (docs/algorithm.md §6). (4 ranks: slow; the
    same uneven path with another split, on one job more of the two cores.)"""
    root = jobs.root / "uneven"
    out = root / f"r{ranks}"
    if ranks == 4:
        own = Jobs(at_once=1)
        start(own, tmp_path / "r4", 4, UNEVEN, ["balanced"])
        out = tmp_path / "r4"
        log = log_of(own, out)
        own.close()
    else:
        log = log_of(jobs, out)
    one = log_of(jobs, root / "r1")
    reference = torch.load(root / "r1" / "balanced.pt")
    worst = max_relative_difference(torch.load(out / "balanced.pt"), reference)
    print(f"max relative weight difference of {ranks} ranks from 1 rank: {worst:.2e}")
    assert worst < 1e-9, worst
    if ranks == 3:
        assert "local MB = [  33/   0/  33]  local last MB = [  10+0/   0+0/  10+0]" in log
    else:
        assert "local MB = [  25/   0/  25]  local last MB = [   7+2/   0+0/   7+2]" in log
        assert "iter/epoch = [11/0/2]" in log
    test_lines = [[line for line in text.splitlines() if line.startswith("model0 (instance 0) test")]
                  for text in (one, log)]
    assert len(test_lines[0]) == 2 and test_lines[1][-1] == test_lines[0][-1]


# Slow: tests/kfac_callback/test_skip_weight_grad.py runs skip_weight_grad on 4 real MPI ranks
# against the plain 1-rank training, and tests/trainer/test_accumulate.py the trainer's path
# with it on 2 real ranks, by default.
@pytest.mark.slow
def test_skip_weight_grad_on_four_ranks_gives_one_ranks_plain_weights(jobs, tmp_path):
    """The trainer path: ip1 and ip2 leave the gradient all-reduce; K-FAC writes their gradients."""
    own = Jobs(at_once=1)
    start(own, tmp_path / "r4", 4, ["model=mlp", *COMMON, "kfac.skip_weight_grad=true"], ["balanced"])
    log_of(own, tmp_path / "r4")
    own.close()
    log_of(jobs, jobs.root / "mlp" / "r1")
    reference = torch.load(jobs.root / "mlp" / "r1" / "all.pt")
    assert max_relative_difference(torch.load(tmp_path / "r4" / "balanced.pt"), reference) < 1e-5


@pytest.mark.parametrize("backend", ["mpi", "gloo"])
def test_adam_two_ranks_equal_one_rank_with_each_cpu_backend(backend, jobs):
    root = jobs.root / "adam"
    log_of(jobs, root / "r1")
    log_of(jobs, root / backend)
    a, b = torch.load(root / "r1" / "all.pt"), torch.load(root / backend / "all.pt")
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
