"""Real torchrun jobs (2 processes, gloo on CPU, real MNIST, float64): the DDP example, K-FAC on a
DDP model with accumulation and resume, and ``kfac.py`` itself started by torchrun, each against
one process on the same global batch (the K-FAC README recipe; docs/algorithm.md §6).

The jobs are independent: the module starts them together and each test checks its results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.support.jobs import Jobs

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
TOLERANCE = 1e-9


EXAMPLE = [str(ROOT / "examples/ddp_kfac.py"), "--steps", "10", "--dtype", "float64"]
KFAC_PY = ["experiment=kfac_mlp", "trainer.epochs=1", "data.max_train_samples=1030", "data.max_test_samples=100",
           "trainer.dtype=float64", "kfac.inverse_dtype=float64", "trainer.flush_denormal=false",
           "trainer.progress=false"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The module's independent jobs, started together (tests/support/jobs.py); ``jobs.root``: their files."""
    root = tmp_path_factory.mktemp("torchrun")
    jobs = Jobs(at_once=3, root=root)
    start = partial(jobs.start, timeout=300, env=ENV, cwd=ROOT)
    start("ddp one", [PYTHON, *EXAMPLE, "--save", str(root / "one.pt")])
    start("ddp two", [*TORCHRUN, *EXAMPLE, "--save", str(root / "two.pt")])
    (root / "job").mkdir()
    start("ddp job", [*TORCHRUN, str(ROOT / "tests/torchrun_job.py"), str(root / "job")])
    common = [*KFAC_PY, f"launcher.experiment_dir={root / 'kfac'}"]
    start("kfac one", [PYTHON, str(ROOT / "kfac.py"), *common, "launcher.job_name=one"])
    start("kfac two", [*TORCHRUN, str(ROOT / "kfac.py"), "--nodes", "1", "--procs-per-node", "2", *common,
                       "launcher.job_name=two", "trainer.accumulate_steps=2"])
    yield jobs
    jobs.close()


def stdout(jobs: Jobs, name: str) -> str:
    result = jobs.result(name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def max_relative_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


def test_the_ddp_example_on_two_processes_gives_one_process_weights(jobs):
    one, two = stdout(jobs, "ddp one"), stdout(jobs, "ddp two")
    a, b = torch.load(jobs.root / "two.pt"), torch.load(jobs.root / "one.pt")
    assert list(b) == ["ip1.weight", "ip2.weight", "ip3.weight"]  # no "module." prefix under DDP
    worst = max_relative_difference(a, b)
    print(f"torchrun 2 processes vs 1: max relative weight difference {worst:.2e}")
    assert worst < TOLERANCE
    losses = [float(re.fullmatch(r"final loss (\S+)", out.strip().splitlines()[-1]).group(1)) for out in (one, two)]
    assert abs(losses[0] - losses[1]) <= TOLERANCE * losses[0]
    torch.manual_seed(42)
    from models import build_model

    initial = {n: p.detach().double() for n, p in build_model("mlp").state_dict().items()}
    assert max_relative_difference(initial, b) > 1e-3  # the run moved the weights


def test_kfac_on_a_ddp_model_accumulates_and_resumes_as_one_process(jobs):
    stdout(jobs, "ddp job")
    results = [json.loads((jobs.root / "job" / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        print(result)
        assert result["comm"] == ["ProcessGroupComm", 2]  # taken from the process group
        assert result["accumulate"] < TOLERANCE  # 2 micro-batches under DDP vs 1 process, no accumulation
        assert result["resume"] < 1e-12 and result["resume_moved"] > 1e-3
        names = result["names"]  # disable_layers=["module.ip3"] meant ip3
        assert names["blocks"] == names["owners"] == names["state"] == ["ip1", "ip2"]
        assert names["model_state"] == ["ip1.weight", "ip2.weight", "ip3.weight"]


def final_weights(work_dir: Path) -> dict:
    checkpoint = sorted((work_dir / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(checkpoint, weights_only=False)["model"]


def test_kfac_py_under_torchrun_with_accumulation_gives_one_ranks_weights(jobs):
    """``torchrun --nproc-per-node 2 kfac.py --nodes 1 --procs-per-node 2`` with 2 micro-batches
    a step against ``kfac.py`` on one rank without: 1030 samples at batch 100 (uneven shares of
    the last batch, 15+15 split in micro-batches of 8 and 7), the README's K-FAC recipe."""
    one, two = stdout(jobs, "kfac one"), stdout(jobs, "kfac two")
    assert "2 ranks started by torchrun, backend gloo" in two
    dirs = {name: next((jobs.root / "kfac").glob(f"*_{name}")) for name in ("one", "two")}
    assert (dirs["two"] / "config.yaml").is_file() and (dirs["two"] / "metrics.jsonl").is_file()
    assert "local last MB = [  15+0/" in (dirs["two"] / "out.log").read_text()
    worst = max_relative_difference(final_weights(dirs["two"]), final_weights(dirs["one"]))
    print(f"kfac.py: torchrun 2 ranks x 2 micro-batches vs 1 rank: max relative weight difference {worst:.2e}")
    assert worst < TOLERANCE
    accuracy = [line for out in (one, two) for line in out.splitlines() if "test accuracy" in line]
    assert len(accuracy) == 2 and accuracy[0] == accuracy[1]


@pytest.mark.parametrize("overrides, message", [
    ([], "torchrun started 2 ranks but the config asks for 1 (launcher.nodes x launcher.procs_per_node): "
         "add --nodes 1 --procs-per-node 2"),
    pytest.param(["--nodes", "1", "--procs-per-node", "2", "trainer.backend=mpi"],
                 "trainer.backend=mpi: torchrun starts no MPI job", marks=pytest.mark.slow),
])
def test_kfac_py_under_torchrun_refuses_in_one_line(overrides, message, tmp_path):
    result = subprocess.run([*TORCHRUN, str(ROOT / "kfac.py"), *overrides, f"launcher.experiment_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("kfac.py:")]
    assert len(ours) == 1 and message in ours[0], result.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # refused before any work dir
