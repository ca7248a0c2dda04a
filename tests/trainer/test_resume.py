"""Kill a real kfac.py run with SIGKILL at a random step, resume it, and get the uninterrupted weights.

One rank: bit for bit. Four ranks (float64): within 1e-6, also when resumed with two ranks.
The reference runs in this process; the runs to kill are real ``kfac.py`` processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from tests.support.jobs import Jobs
from trainer.checkpoint import list_checkpoints, load_checkpoint, newest_checkpoint
from trainer.config import Config
from trainer.run import train

ROOT = Path(__file__).resolve().parent.parent.parent
ConfigStore.instance().store(name="schema", node=Config)
# 10 steps of 20 samples; K-FAC on the last layer only (its inverses every 3 steps) keeps steps cheap.
SMALL = ["trainer.epochs=2", "data.max_train_samples=100", "data.max_test_samples=20", "trainer.mini_batch_size=20",
         "trainer.progress=false", "trainer.num_threads=1", "optimizer=momentum", "optimizer.learning_rate=0.01",
         "kfac.enabled=true", "kfac.disable_layers=[ip1,ip2]", "kfac.compute_interval_steps=3",
         "kfac.damping_act=[0.1]", "kfac.damping_err=[0.1]"]


def reference(tmp_path: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted one-rank run in this process."""
    threads = torch.get_num_threads()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*SMALL, *overrides])
        train(cfg, str(tmp_path / "reference"))
    finally:
        torch.set_num_threads(threads)
    return load_checkpoint(newest_checkpoint(tmp_path / "reference"))["model"]


def start(exp: Path, *overrides: str) -> subprocess.Popen:
    # A session of its own, so SIGKILL reaches every rank (and mpiexec) at once.
    return subprocess.Popen([sys.executable, str(ROOT / "kfac.py"), *SMALL, f"launcher.experiment_dir={exp}", *overrides],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_at_random_step(proc: subprocess.Popen, exp: Path, last_step: int) -> int:
    """SIGKILLs the run once it has checkpointed a random step; returns the newest step on disk then."""
    target = random.Random().randint(1, last_step - 2)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        found = [c for d in exp.glob("*/checkpoints") for c in list_checkpoints(d)]
        if found and int(found[-1].stem.split("_")[1]) >= target:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (work_dir,) = exp.iterdir()
    return int(newest_checkpoint(work_dir).stem.split("_")[1])


def finish(exp: Path, *overrides: str) -> tuple[Path, str]:
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), *SMALL, f"launcher.experiment_dir={exp}", *overrides],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return Path(re.search(r"^work dir: (.+)$", result.stdout, re.M).group(1)), result.stdout


def test_one_rank_killed_at_a_random_step_resumes_bit_for_bit(tmp_path):
    expected = reference(tmp_path)
    exp = tmp_path / "exp"
    proc = start(exp, "trainer.checkpoint_every_steps=1")
    killed_at = kill_at_random_step(proc, exp, last_step=10)
    print(f"killed after the checkpoint of step {killed_at}")
    work_dir, out = finish(exp, "trainer.resume=latest")
    assert f"step_{killed_at:06d}.pt: step {killed_at}" in out
    final = load_checkpoint(newest_checkpoint(work_dir))
    assert final["step"] == 10
    for name, tensor in expected.items():
        assert torch.equal(final["model"][name], tensor), name
    records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]  # epoch 0 came with the checkpoint when killed in epoch 1


def test_four_ranks_killed_at_a_random_step_resume_with_four_or_two_ranks(tmp_path):
    expected = reference(tmp_path, "trainer.dtype=float64")
    exp = tmp_path / "exp"
    proc = start(exp, "trainer.dtype=float64", "--procs-per-node", "4", "trainer.checkpoint_every_steps=1",
                 "trainer.keep_checkpoints=20")
    killed_at = kill_at_random_step(proc, exp, last_step=10)
    print(f"killed after the checkpoint of step {killed_at}")
    (killed,) = exp.iterdir()
    worst = {}
    jobs = Jobs(at_once=2)  # the two resumptions are independent: side by side
    for ranks in (4, 2):
        jobs.start(str(ranks), [sys.executable, str(ROOT / "kfac.py"), *SMALL, f"launcher.experiment_dir={exp}",
                                "trainer.dtype=float64", "--procs-per-node", str(ranks), f"trainer.resume={killed}",
                                f"launcher.job_name=resumed{ranks}"], cwd=ROOT, timeout=300)
    for ranks in (4, 2):
        result = jobs.result(str(ranks))
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        work_dir = Path(re.search(r"^work dir: (.+)$", out, re.M).group(1))
        assert f"step {killed_at}, " in out and "written by 4 rank(s)" in out
        final = load_checkpoint(newest_checkpoint(work_dir))
        worst[ranks] = max(float((final["model"][n] - t).abs().max()) for n, t in expected.items())
    jobs.close()
    print(f"max |difference| from one uninterrupted rank: {worst}")
    assert max(worst.values()) <= 1e-6
