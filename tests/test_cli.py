"""kfac.py end to end: bad input is one line and exit status 2; small real runs work."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.support.jobs import Jobs

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.max_train_samples=300", "data.max_test_samples=200"]


def kfac(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "kfac.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


BAD = [
    (["--bogus"], "--bogus: unknown flag"),
    (["--model", "foo"], "--model: 'foo' is not one of autoencoder, cnn, mlp, resnet, resnet_dw, vit"),
    (["--mini_batch_size", "0"], "--mini_batch_size: expected an integer >= 1, got 0"),
    (["--optimizer-learning-rate", "abc"], "--optimizer-learning-rate: expected a number, got 'abc'"),
    (["--num_epochs", "0"], "--num_epochs: expected an integer >= 1, got 0"),
    (["trainer.mini_batch_size=abc"], "trainer.mini_batch_size"),
    (["trainer.nonexistent=1"], "trainer.nonexistent"),
    (["optimizer=lbfgs"], "optimizer=lbfgs: no such optimizer config"),
    (["trainer.epochs=-2", "trainer.device=tpu"],
     "trainer.epochs: must be >= 1, got -2 (0 epochs would train nothing); trainer.device"),
    (["kfac.damping_act=[0.01,1]"], "kfac.damping_act"),
]


@pytest.fixture(scope="module")
def bad_runs():
    """Every ``BAD`` invocation, run side by side (tests/support/jobs.py): each costs a Python start-up."""
    jobs = Jobs(at_once=3)
    for i, (args, _) in enumerate(BAD):
        jobs.start(str(i), [sys.executable, str(ROOT / "kfac.py"), *args], cwd=ROOT, timeout=300)
    yield jobs
    jobs.close()


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_and_status_2(args, message, bad_runs):
    result = bad_runs.result(str(BAD.index((args, message))))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_lists_lbann_flags_and_hydra_usage():
    result = kfac("--help")
    assert result.returncode == 0
    assert "--kfac-damping-act" in result.stdout and "Powered by Hydra" in result.stdout


def test_cfg_job_prints_the_composed_config():
    result = kfac("--model", "cnn", "--kfac", "--kfac-damping-err", "10,1", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "name: cnn" in result.stdout and "enabled: true" in result.stdout
    assert "damping_err:\n  - 10.0\n  - 1.0" in result.stdout


def test_a_small_real_run_prints_lbann_lines_and_writes_metrics(tmp_path):
    result = kfac("--num_epochs", "2", "--mini_batch_size", "50", *SMALL,
                  f"launcher.experiment_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "[1] Epoch : stats formated [tr/v/te] iter/epoch = [6/0/4]" in result.stdout
    assert "model0 (instance 0) test accuracy : " in result.stdout
    (work_dir,) = tmp_path.iterdir()
    records = [json.loads(x) for x in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]


def test_multirun_runs_each_override(tmp_path):
    result = kfac("-m", "--num_epochs", "1", *SMALL, "optimizer=sgd,adam",
                  f"launcher.experiment_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model0 (instance 0) test accuracy : ") == 2


def test_setup_only_writes_the_work_dir_and_runs_nothing(tmp_path):
    result = kfac("--setup-only", "--procs-per-node", "4", "--kfac", "--job-name", "mnist",
                  f"launcher.experiment_dir={tmp_path}", "launcher.scheduler=mpiexec")
    assert result.returncode == 0, result.stderr
    (work_dir,) = tmp_path.iterdir()
    assert f"work dir: {work_dir}" in result.stdout
    assert sorted(p.name for p in work_dir.iterdir()) == ["batch.sh", "config.yaml"]
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    assert (work_dir / "batch.sh").read_text() == f"""\
#!/bin/bash

cd {work_dir} || exit 1
export KFAC_LAUNCHED=1
export PYTHONUNBUFFERED=1
echo "Started at $(date)"
{mpiexec} -n 4 {sys.executable} -m mpi4py {ROOT / 'kfac.py'} launcher.procs_per_node=4\
 kfac.enabled=true launcher.job_name=mnist launcher.experiment_dir={tmp_path} launcher.scheduler=mpiexec\
 hydra.run.dir={work_dir} hydra.output_subdir=null
status=$?
echo "Finished at $(date) with status $status"
exit $status
"""
    config = (work_dir / "config.yaml").read_text()
    assert "procs_per_node: 4" in config and "enabled: true" in config



def bare_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH holds this Python and nothing of SLURM or MPI (a laptop)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "python").symlink_to(sys.executable)
    return dict(os.environ, PATH=str(folder))


def test_setup_only_writes_a_slurm_script_without_slurm_and_says_sbatch(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), "--setup-only", "launcher=slurm", "--nodes", "2",
                             "--procs-per-node", "2", "--time-limit", "30", f"launcher.experiment_dir={tmp_path / 'x'}"],
                            capture_output=True, text=True, env=bare_path(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    (work_dir,) = (tmp_path / "x").iterdir()
    assert f"setup only: run it with  sbatch {work_dir / 'batch.sh'}" in result.stdout
    script = (work_dir / "batch.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "srun --mpi=pmi2 --kill-on-bad-exit=1" in script


@pytest.mark.parametrize("args", [["--batch-job", "launcher=slurm"], ["launcher=slurm", "--procs-per-node", "2"]])
def test_a_run_that_cannot_start_for_want_of_slurm_leaves_no_work_dir(tmp_path, args):
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), *args, f"launcher.experiment_dir={tmp_path / 'x'}"],
                            capture_output=True, text=True, env=bare_path(tmp_path), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not on PATH" in lines[0] and "--setup-only" in lines[0], lines
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_kfac_options_without_kfac_are_named_in_one_note(tmp_path):
    with ThreadPoolExecutor(max_workers=3) as pool:  # independent runs: side by side
        cfg, plain, with_kfac = pool.map(lambda args: kfac(*args), [
            ["--kfac-damping-act", "0.1", "kfac.inverse_strategy=root", "--cfg", "job"],
            ["--num_epochs", "1", *SMALL, "--kfac-damping-act", "0.1", f"launcher.experiment_dir={tmp_path / 'plain'}"],
            ["--num_epochs", "1", *SMALL, "--kfac", "--kfac-damping-act", "0.1",
             f"launcher.experiment_dir={tmp_path / 'kfac'}"]])
    assert cfg.returncode == 0
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr.strip() == "kfac.py: note: kfac.damping_act has no effect without --kfac (kfac.enabled=true)"
    assert with_kfac.returncode == 0 and "note" not in with_kfac.stderr, with_kfac.stderr


def test_keep_checkpoints_zero_writes_none(tmp_path):
    result = kfac("--num_epochs", "1", *SMALL, "trainer.keep_checkpoints=0", f"launcher.experiment_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    (work_dir,) = tmp_path.iterdir()
    assert (work_dir / "metrics.jsonl").exists() and not (work_dir / "checkpoints").exists()


def test_help_into_a_pipe_that_closes_is_quiet():
    result = subprocess.run(f"{sys.executable} {ROOT / 'kfac.py'} --help | head -c 10", shell=True,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout == "kfac.py: t" and result.stderr == ""


def test_the_readme_batch_script_is_what_setup_only_writes(tmp_path):
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("<!-- batch-script-example -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].rstrip(" ")
    shown = "".join(line[2:] if line.startswith("  ") else line.lstrip(" ") for line in shown.splitlines(keepends=True))
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), "--setup-only", "--batch-job", "launcher=slurm",
                             "--nodes", "2", "--procs-per-node", "4", "--time-limit", "60", "--kfac"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, KFAC_EXPERIMENT_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    (work_dir,) = tmp_path.iterdir()
    written = (work_dir / "batch.sh").read_text()
    written = written.replace(str(work_dir), "/home/me/experiments/20261202_120000_kfac")
    written = written.replace(sys.executable, "/home/me/kfac/.venv/bin/python").replace(str(ROOT), "/home/me/kfac")
    assert written == shown


def test_the_readme_error_examples_are_what_kfac_py_says():
    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"^\$ python3 kfac\.py (.+?)(?:\s+#.*)?\n(kfac\.py: error: .+)$", readme, flags=re.M)
    assert len(examples) >= 4
    examples = [(args, message) for args, message in examples if not ("cuda" in args and torch.cuda.is_available())]
    with ThreadPoolExecutor(max_workers=3) as pool:  # independent runs: side by side
        results = list(pool.map(lambda example: kfac(*shlex.split(example[0])), examples))
    for (args, message), result in zip(examples, results, strict=True):
        assert (result.returncode, result.stderr.strip()) == (2, message), args
