"""trainer.full_train_objective and trainer.stop_at_train_objective: the objective on the whole
training set at each periodic test, equal to a dense evaluation, and the stop it drives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from kfac_callback.base import Callback
from launcher.workdir import read_metrics
from models import build_model
from tests.support.configs import config_with
from tests.support.data import real_mnist
from tests.support.hooks import HookRecorder
from tests.support.jobs import Jobs
from tests.support.trainers import make_trainer
from trainer.checkpoint import load_checkpoint, newest_checkpoint
from trainer.config import validate
from trainer.observe.callbacks import TimerCallback

ROOT = Path(__file__).resolve().parent.parent.parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


@torch.no_grad()
def dense(model, x, y) -> tuple[float, float]:
    """Objective and accuracy (%) of ``model`` on all of ``x`` at once, in eval mode."""
    was = model.training
    model.eval()
    logits = model(x)
    model.train(was)
    return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(1) == y).double().mean().item()


class DenseAtTests(Callback):
    """The dense full-train evaluation at the end of each step a periodic test follows."""

    def __init__(self, every: int) -> None:
        self.every, self.seen = every, {}

    def on_batch_end(self, trainer) -> None:
        if trainer.step % self.every == 0:
            self.seen[trainer.step] = dense(trainer.model, trainer.data.train_x, trainer.data.train_y)


def full_run(tmp_path: Path, **options):
    # 45 samples in batches of 10: 5 steps an epoch, the last one of 5 samples.
    tmp_path.mkdir(parents=True, exist_ok=True)
    probe = DenseAtTests(2)
    lines: list[str] = []
    t = make_trainer([probe, TimerCallback()], epochs=3, n_train=45, dtype=torch.float64, lines=lines,
                     metrics_path=str(tmp_path / "m.jsonl"), test_every_steps=2, full_train_objective=True, **options)
    history = t.fit()
    return t, history, probe.seen, [r for r in read_metrics(tmp_path / "m.jsonl") if r.get("kind") == "test"], lines


def test_the_recorded_full_train_objective_is_the_dense_evaluation(tmp_path):
    t, history, seen, tests, lines = full_run(tmp_path)
    assert [r["step"] for r in tests] == [2, 4, 6, 8, 10, 12, 14, 15]  # 15: the final test's record
    for r in tests[:-1]:
        loss, accuracy = seen[r["step"]]
        assert abs(r["train_objective_full"] - loss) <= 1e-12 and r["train_accuracy_full"] == pytest.approx(accuracy)
    final = dense(t.model, t.data.train_x, t.data.train_y)
    assert abs(tests[-1]["train_objective_full"] - final[0]) <= 1e-12
    # Not the epoch's running mean, which mixes the weights of every step.
    assert history[-1]["train_objective"] != pytest.approx(final[0], abs=1e-6)
    periodic = [line for line in lines if line.startswith("trainer: step 4 (epoch 0)")]
    assert len(periodic) == 1 and f"full training objective {tests[1]['train_objective_full']:.6g} (accuracy" in periodic[0]


def test_off_by_default_and_the_training_is_the_same(tmp_path):
    on, _, _, _, _ = full_run(tmp_path / "on")
    off = make_trainer(epochs=3, n_train=45, dtype=torch.float64, metrics_path=str(tmp_path / "off.jsonl"),
                       test_every_steps=2)
    off.fit()
    assert all("train_objective_full" not in r for r in read_metrics(tmp_path / "off.jsonl"))
    for name, value in on.model.state_dict().items():
        assert torch.equal(value, off.model.state_dict()[name]), name


def test_stop_at_train_objective_ends_the_run_at_the_first_test_at_or_below_it(tmp_path):
    _, _, _, tests, _ = full_run(tmp_path / "all")
    objectives = [r["train_objective_full"] for r in tests[:-1]]
    # The third test's value: the run stops at the first test whose objective is at or below it.
    target = objectives[2]
    first = next(i for i, v in enumerate(objectives) if v <= target)
    rec = HookRecorder()
    lines: list[str] = []
    t = make_trainer([rec, TimerCallback()], epochs=3, n_train=45, dtype=torch.float64, lines=lines,
                     metrics_path=str(tmp_path / "stop.jsonl"), test_every_steps=2, full_train_objective=True,
                     stop_at_train_objective=target)
    history = t.fit()
    step = tests[first]["step"]
    assert t.step == step and t.reached_objective == objectives[first] and t.reached is None
    assert history[-1]["step"] == step and rec.calls.count("on_train_end") == 1
    assert [r["step"] for r in read_metrics(tmp_path / "stop.jsonl") if r.get("kind") == "test"] == \
        [r["step"] for r in tests[:first + 1]]
    (stop,) = [line for line in lines if "stop_at_train_objective" in line]
    assert stop.startswith(f"trainer: full training objective {objectives[first]:.6g} <= "
                           f"trainer.stop_at_train_objective={target:g} at step {step} (epoch {(step - 1) // 5})")
    assert stop.endswith("s of training; run stopped")


@pytest.mark.parametrize("values,message", [
    ({"full_train_objective": True}, "trainer.full_train_objective: needs trainer.test_every_steps > 0"),
    ({"stop_at_train_objective": 0.1, "test_every_steps": 5},
     "trainer.stop_at_train_objective: needs trainer.full_train_objective=true and trainer.test_every_steps > 0"),
    ({"stop_at_train_objective": 0.1, "full_train_objective": True},
     "trainer.full_train_objective: needs trainer.test_every_steps > 0"),
    ({"stop_at_train_objective": 0.0, "full_train_objective": True, "test_every_steps": 5},
     "trainer.stop_at_train_objective: must be a cross-entropy > 0 (or null), got 0.0"),
])
def test_bad_values_name_their_key(values, message):
    errors = validate(config_with("trainer", **values))
    assert len(errors) == 1 and message in errors[0], errors


def test_good_values_pass():
    assert validate(config_with("trainer", full_train_objective=True, test_every_steps=10)) == []
    assert validate(config_with("trainer", full_train_objective=True, test_every_steps=10, stop_at_train_objective=0.05)) == []


def test_kfac_py_rejects_a_stop_without_the_full_objective_in_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), "trainer.stop_at_train_objective=0.1",
                             "trainer.test_every_steps=5"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("kfac.py: error: trainer.stop_at_train_objective: needs trainer.full_train_objective"
                                     "=true and trainer.test_every_steps > 0 (the objective it checks is measured at "
                                     "those tests)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """kfac.py at 1 and 2 ranks, started together (tests/support/jobs.py); ``runs.root / "<ranks>"``: their runs."""
    root = tmp_path_factory.mktemp("runs")
    jobs = Jobs(at_once=2, root=root)
    for ranks in (1, 2) if os.access(MPIEXEC, os.X_OK) else (1,):
        # 150 samples in batches of 40 (4 steps an epoch, the last of 30; with 2 ranks 20 + 20 and 15 + 15).
        cmd = [sys.executable, str(ROOT / "kfac.py"), "--procs-per-node", str(ranks), "--num_epochs", "20",
               "--mini_batch_size", "40", "data.max_train_samples=150", "data.max_test_samples=50",
               "trainer.dtype=float64", "trainer.num_threads=1", "trainer.progress=false", "--optimizer", "sgd",
               "--optimizer-learning-rate", "0.05", "trainer.test_every_steps=3", "trainer.full_train_objective=true",
               "trainer.stop_at_train_objective=100", f"launcher.experiment_dir={root / str(ranks)}"]
        jobs.start(str(ranks), cmd, cwd=ROOT, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    yield jobs
    jobs.close()


@pytest.mark.parametrize("ranks", [1, 2])
def test_kfac_py_measures_real_mnist_and_stops_with_exit_0(ranks, runs):
    if ranks > 1 and not os.access(MPIEXEC, os.X_OK):
        pytest.skip("needs the venv's mpiexec")
    result = runs.result(str(ranks))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "<= trainer.stop_at_train_objective=100 at step 3 (epoch 0)" in result.stdout
    (work_dir,) = (runs.root / str(ranks)).iterdir()
    records = read_metrics(work_dir / "metrics.jsonl")
    assert [(r.get("kind", "epoch"), r["step"]) for r in records] == [("test", 3), ("epoch", 3)]
    # The final checkpoint holds the weights of step 3: evaluate them densely on the same 150 samples.
    saved = load_checkpoint(newest_checkpoint(work_dir))
    assert saved["step"] == 3
    model = build_model("mlp").double()
    model.load_state_dict(saved["model"])
    data = real_mnist(150, 50)  # the samples kfac.py read
    loss, accuracy = dense(model, data.train_x.double(), data.train_y)
    assert abs(records[0]["train_objective_full"] - loss) <= 1e-12
    assert records[0]["train_accuracy_full"] == pytest.approx(accuracy)
