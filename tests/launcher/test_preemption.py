"""Preemption on a real (private, local) SLURM: USR1 to the job steps, checkpoint, requeue, resume.

``scancel --signal=USR1`` signals the job steps and not the batch shell, as ``#SBATCH
--signal=USR1@N`` does before the time limit. The local SLURM (tests/launcher/conftest.py) has
``cred_expire=5``: a requeued job waits that long before it starts again (120 s by default).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from launcher.batch import render_batch_script
from launcher.config import LauncherConfig
from launcher.launch import Run, batch_spec
from trainer.checkpoint import list_checkpoints, load_checkpoint, newest_checkpoint

ROOT = Path(__file__).resolve().parent.parent.parent
# 100 steps (about 2 s): enough for the signal to arrive mid-run on an idle machine.
SMALL = ["trainer.epochs=20", "data.max_train_samples=100", "data.max_test_samples=20", "trainer.mini_batch_size=20",
         "trainer.num_threads=1", "trainer.progress=false"]


def test_batch_script_asks_for_usr1_before_the_limit_and_requeues_after_a_stop():
    run = Run(launcher=LauncherConfig(time_limit=30, requeue=True), work_dir=Path("/w"), overrides=["a=1"],
              config_yaml="", script="/k/kfac.py")
    text = render_batch_script(batch_spec(run, "slurm", "/py"))
    assert "#SBATCH --signal=USR1@120\n#SBATCH --requeue\n#SBATCH --open-mode=append\n" in text
    assert 'if [ "$status" -eq 0 ] && [ -e preempted ] && [ -n "${SLURM_JOB_ID:-}" ]; then\n' in text
    assert '  scontrol requeue "$SLURM_JOB_ID"\nfi\nexit $status\n' in text
    short = Run(launcher=LauncherConfig(time_limit=2), work_dir=Path("/w"), overrides=[], config_yaml="", script="/k")
    assert "--signal=USR1@60\n" in render_batch_script(batch_spec(short, "slurm", "/py"))  # at most half the limit
    untimed = Run(launcher=LauncherConfig(), work_dir=Path("/w"), overrides=[], config_yaml="", script="/k")
    assert "--signal" not in render_batch_script(batch_spec(untimed, "slurm", "/py"))


def test_usr1_checkpoints_requeues_and_the_job_resumes_to_the_same_weights(local_slurm, tmp_path):
    slurm = local_slurm  # tests/launcher/conftest.py: its credentials expire in 5 s
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), "--batch-job", "--job-name", "preempt", *SMALL,
                             "launcher.requeue=true", "trainer.checkpoint_every_steps=2", f"launcher.experiment_dir={tmp_path}"],
                            capture_output=True, text=True, cwd=ROOT, env=slurm.env(), timeout=120)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted batch job (\d+)", result.stdout).group(1)
    (work_dir,) = tmp_path.iterdir()
    deadline = time.monotonic() + 180
    while not list_checkpoints(work_dir / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm.env(), check=True, timeout=30)
    assert slurm.wait_for_job(job_id, timeout_s=300) == "COMPLETED", slurm.logs()
    out = (work_dir / "out.log").read_text()
    stop = re.search(r"trainer: stopped by SIGUSR1 at step (\d+)", out)
    assert stop and "requeueing job" in out, out
    assert f"step_{int(stop.group(1)):06d}.pt: step {stop.group(1)}" in out  # the requeued job resumed there
    assert not (work_dir / "preempted").exists()
    records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(20))
    final = load_checkpoint(newest_checkpoint(work_dir))
    assert final["step"] == 100
    # The same run without the interruption, here and now: bit for bit the same weights.
    reference = subprocess.run([sys.executable, str(ROOT / "kfac.py"), *SMALL, f"launcher.experiment_dir={tmp_path / 'ref'}"],
                               capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert reference.returncode == 0, reference.stderr
    expected = load_checkpoint(newest_checkpoint(next((tmp_path / "ref").iterdir())))["model"]
    for name, tensor in expected.items():
        assert torch.equal(final["model"][name], tensor), name
