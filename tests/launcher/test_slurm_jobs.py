"""kfac.py on a real (private, local) SLURM: a batch job and a sweep of two jobs."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cluster.slurm_daemons import LocalSlurm, missing_programs

ROOT = Path(__file__).resolve().parent.parent.parent
SMALL = ["--num_epochs", "1", "data.max_train_samples=400", "data.max_test_samples=200"]

pytestmark = pytest.mark.skipif(bool(missing_programs()), reason="SLURM is not installed (.ci/install-slurm)")


@pytest.fixture
def slurm(local_slurm):
    return local_slurm  # tests/launcher/conftest.py


def kfac(slurm: LocalSlurm, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "kfac.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=slurm.env(), timeout=300)


def test_batch_job_runs_two_ranks_and_logs_lbann_lines(slurm, tmp_path):
    result = kfac(slurm, "--nodes", "1", "--procs-per-node", "2", "--batch-job", "--job-name", "slurmtest",
                  *SMALL, f"launcher.experiment_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted batch job (\d+)", result.stdout).group(1)
    (work_dir,) = tmp_path.iterdir()
    assert re.fullmatch(r"\d{8}_\d{6}_slurmtest", work_dir.name)
    script = (work_dir / "batch.sh").read_text()
    assert "#SBATCH --ntasks=2" in script and "srun --mpi=pmi2" in script
    assert slurm.wait_for_job(job_id, timeout_s=240) == "COMPLETED", slurm.logs()
    out = (work_dir / "out.log").read_text()
    assert "local MB = [  50/   0/  50]" in out  # 100 per global batch over 2 ranks
    assert "model0 (instance 0) training epoch 0 objective function : " in out
    assert re.search(r"model0 \(instance 0\) test accuracy : [0-9.]+%", out)
    assert "Finished at" in out and "with status 0" in out
    assert (work_dir / "metrics.jsonl").read_text().count("\n") == 1


def test_sweep_of_two_batch_jobs_and_its_summary(slurm, tmp_path):
    result = kfac(slurm, "-m", "--batch-job", *SMALL, "optimizer=sgd,adam", f"launcher.experiment_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("submitted batch job") == 2
    (sweep_dir,) = tmp_path.iterdir()
    summary = subprocess.run([sys.executable, "-m", "launcher.sweep", str(sweep_dir), "--wait", "--timeout", "300"],
                             capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert summary.returncode == 0, summary.stdout + summary.stderr + slurm.logs()
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert "optimizer=sgd" in rows[0]["overrides"] and "optimizer=adam" in rows[1]["overrides"]
    for row in rows:
        assert 0 < float(row["final_test_accuracy"]) <= 100
    assert "final_test_accuracy" in summary.stdout
