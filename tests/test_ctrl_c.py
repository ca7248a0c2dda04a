"""Ctrl-C on a real run, at 1 rank and at 2 MPI ranks: a checkpoint, one resume hint, no traceback.

Ctrl-C is a SIGINT to the terminal's foreground process group: ``kfac.py`` and, with several
ranks, the script's mpiexec, which passes it on to each rank once. The first one stops the run at the end of its step with a
checkpoint, as SIGTERM does; a resumed run then finishes the epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.checkpoint import newest_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--num_epochs", "1", "data.max_train_samples=4000", "data.max_test_samples=100", "trainer.mini_batch_size=20",
       "trainer.progress=false", "trainer.checkpoint_every_steps=5", "trainer.num_threads=1"]


def started(work_dirs: Path, timeout: float = 120) -> Path:
    """The work dir, once its first checkpoint shows that training runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for checkpoints in work_dirs.glob("*/checkpoints"):
            if newest_checkpoint(checkpoints.parent) is not None:
                return checkpoints.parent
        time.sleep(0.2)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("ranks", [1, 2])
def test_ctrl_c_checkpoints_says_how_to_resume_and_the_resume_finishes(tmp_path, ranks):
    argv = [sys.executable, str(ROOT / "kfac.py"), *RUN, f"--procs-per-node={ranks}", f"launcher.experiment_dir={tmp_path}"]
    # A session of its own, as a terminal gives a command: Ctrl-C is SIGINT to its whole group.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    work_dir = started(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err
    hints = [line for line in out.splitlines() if line.startswith("trainer: stopped by SIGINT")]
    assert len(hints) == 1 and f"resume with trainer.resume={work_dir}" in hints[0], out
    assert err.count("Ctrl-C: ") == 1, err
    stopped_at = newest_checkpoint(work_dir)
    assert (work_dir / "preempted").read_text().strip() == str(stopped_at)

    if ranks > 1:
        return  # resuming at any rank count is tested in tests/trainer/test_resume.py
    resumed = subprocess.run([*argv, f"trainer.resume={work_dir}"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {stopped_at}" in resumed.stdout
    (record,) = [json.loads(line) for line in (sorted(tmp_path.iterdir())[-1] / "metrics.jsonl").read_text().splitlines()
                 if '"kind"' not in line]
    assert record["step"] == 4000 // 20  # the whole epoch, the stopped part and the resumed part
