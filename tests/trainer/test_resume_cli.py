"""Resuming through the real ``kfac.py``: a damaged newest checkpoint is passed over and named,
``trainer.resume=<work dir>`` alone continues that run with its saved config, and the clock
(``wall_time``, ``train_time``) goes on from the checkpoint. Each resumed run ends where the
uninterrupted one ended: the same weights (one rank, bit for bit) and the same records.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent.parent
# 2 epochs of 5 steps; checkpoints at steps 3, 6, 9 and the final 10 (tests/trainer/test_resume.py's run).
SMALL = ["trainer.epochs=2", "data.max_train_samples=100", "data.max_test_samples=20", "trainer.mini_batch_size=20",
         "trainer.progress=false", "trainer.num_threads=1", "optimizer=momentum", "optimizer.learning_rate=0.01",
         "kfac.enabled=true", "kfac.disable_layers=[ip1,ip2]", "kfac.compute_interval_steps=3",
         "kfac.damping_act=[0.1]", "kfac.damping_err=[0.1]", "trainer.checkpoint_every_steps=3",
         "trainer.keep_checkpoints=10"]
TIMES = {"run_time", "wall_time", "train_time", "minibatch_time"}


def kfac(*argv: str, status: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == status, result.stdout + result.stderr
    return result


def work_dir_of(result: subprocess.CompletedProcess) -> Path:
    return Path(re.search(r"^work dir: (.+)$", result.stdout, re.M).group(1))


def records(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def without_times(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in recs]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One whole run; each test copies it and damages or removes its newest checkpoints."""
    exp = tmp_path_factory.mktemp("uninterrupted")
    return work_dir_of(kfac(*SMALL, f"launcher.experiment_dir={exp}"))


def copy_run(uninterrupted: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "exp" / uninterrupted.name
    shutil.copytree(uninterrupted, copy)
    text = (copy / "config.yaml").read_text().replace(str(uninterrupted.parent), str(copy.parent))
    (copy / "config.yaml").write_text(text)  # its runs go beside it
    return copy


def assert_ends_as(work_dir: Path, uninterrupted: Path) -> None:
    final = load_checkpoint(work_dir / "checkpoints" / "step_000010.pt")
    expected = load_checkpoint(uninterrupted / "checkpoints" / "step_000010.pt")
    assert final["step"] == 10
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    assert without_times(records(work_dir)) == without_times(records(uninterrupted))


def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_resumed(uninterrupted, tmp_path):
    killed = copy_run(uninterrupted, tmp_path)
    ckpts = killed / "checkpoints"
    newest = ckpts / "step_000010.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])  # truncated, as by a lost node
    (ckpts / "step_000009.pt").write_bytes(b"PK\x03\x04" + bytes(500))  # damaged
    result = kfac(*SMALL, f"launcher.experiment_dir={killed.parent}", "trainer.resume=latest")
    (note,) = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert note == (f"kfac.py: note: passed over damaged checkpoints {newest.resolve()}, step_000009.pt (is damaged "
                    f"or truncated: {note.split('truncated: ')[1].split(')')[0]}); resuming from "
                    f"{(ckpts / 'step_000006.pt').resolve()}, the newest intact one")
    assert f"resumed from {(ckpts / 'step_000006.pt').resolve()}: step 6, epoch 1, batch 1" in result.stdout
    assert_ends_as(work_dir_of(result), uninterrupted)


def test_the_work_dir_alone_resumes_with_its_config_and_its_clock(uninterrupted, tmp_path):
    killed = copy_run(uninterrupted, tmp_path)
    (killed / "checkpoints" / "step_000010.pt").unlink()  # killed after step 9's checkpoint
    at_9 = load_checkpoint(killed / "checkpoints" / "step_000009.pt")
    result = kfac(f"trainer.resume={killed}")  # nothing else: model, optimizer, K-FAC, data from config.yaml
    assert f"resuming with the config of {killed / 'config.yaml'}\n" in result.stdout
    resumed = work_dir_of(result)
    assert resumed.parent == killed.parent
    assert_ends_as(resumed, uninterrupted)
    # The clock goes on from the checkpoint: wall_time and train_time only grow, past step 9's.
    recs = records(resumed)
    assert recs[0] == records(killed)[0]  # epoch 0 as the checkpoint holds it
    for key in ("wall_time", "train_time"):
        assert recs[0][key] < at_9[key] < recs[1][key], key
    assert recs[1]["train_time"] <= recs[1]["wall_time"]
    saved = (killed / "config.yaml").read_text().splitlines()
    mine = (resumed / "config.yaml").read_text().splitlines()
    assert [a for a, b in zip(saved, mine, strict=True) if a != b] == ["  resume: null"]


def test_overrides_beside_the_work_dir_may_change_the_epochs_but_must_agree_on_the_run(uninterrupted, tmp_path):
    done = copy_run(uninterrupted, tmp_path)
    refused = kfac(f"trainer.resume={done}", "seed=7", status=2)
    assert refused.stderr.splitlines() == [
        f"kfac.py: error: checkpoint {(done / 'checkpoints' / 'step_000010.pt').resolve()} is from a different "
        "run: seed is 42 there, 7 here"]
    assert len(list(done.parent.iterdir())) == 1  # no work dir made
    longer = kfac(f"trainer.resume={done}", "--num_epochs", "3")
    assert "and here: trainer.epochs=3" in longer.stdout
    recs = records(work_dir_of(longer))
    assert [r["step"] for r in recs] == [5, 10, 15] and without_times(recs[:2]) == without_times(records(done))


@pytest.mark.slow  # two 2-rank runs through mpiexec: about a minute on 2 cores
def test_two_ranks_pass_over_a_damaged_checkpoint_and_end_as_the_uninterrupted_run_float64(tmp_path):
    two = [*SMALL, "trainer.dtype=float64", "--procs-per-node", "2"]
    whole = work_dir_of(kfac(*two, f"launcher.experiment_dir={tmp_path / 'whole'}"))
    killed = copy_run(whole, tmp_path)
    newest = killed / "checkpoints" / "step_000010.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    result = kfac(f"trainer.resume={killed}")  # its config: float64, 2 ranks
    assert f"passed over damaged checkpoint {newest.resolve()} (" in result.stderr
    assert "step 9, epoch 1, batch 4 (written by 2 rank(s))" in result.stdout
    resumed = work_dir_of(result)
    final = load_checkpoint(resumed / "checkpoints" / "step_000010.pt")["model"]
    expected = load_checkpoint(whole / "checkpoints" / "step_000010.pt")["model"]
    worst = max(float((final[n] - t).norm() / t.norm()) for n, t in expected.items())
    print(f"2 ranks, resumed past a damaged checkpoint: max relative difference {worst:.2e}")
    assert worst <= 1e-9
    assert without_times(records(resumed)) == without_times(records(whole))
