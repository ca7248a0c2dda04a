"""trainer.test_every_steps and trainer.stop_at_test_accuracy: test records, the training clock, early stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher.workdir import read_metrics
from tests.support.configs import config_with
from tests.support.hooks import HookRecorder
from tests.support.jobs import Jobs
from tests.support.trainers import make_trainer
from trainer.config import validate
from trainer.observe.callbacks import TimerCallback

ROOT = Path(__file__).resolve().parent.parent.parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def slow_tests(trainer, seconds: float, accuracies=None) -> list[int]:
    """Makes each real evaluation of ``trainer`` take ``seconds`` longer (and return ``accuracies`` in
    turn, if given); returns the list the evaluated steps are appended to."""
    evaluate, steps = trainer.evaluate, []

    def slow():
        last = trainer.evaluator.last_test
        cached = last is not None and last[0] == trainer.step
        loss, acc = evaluate()
        if not cached:
            steps.append(trainer.step)
            time.sleep(seconds)
            if accuracies is not None:
                acc = accuracies[len(steps) - 1]
                trainer.evaluator.last_test = (trainer.step, loss, acc)
        return loss, acc

    trainer.evaluate = slow
    return steps


def test_test_records_at_every_nth_step_with_a_clock_that_leaves_tests_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # 4 steps an epoch, 3 epochs: periodic tests at 3, 6, 9, 12; the final test at 12 is the same one.
    t = make_trainer([TimerCallback()], epochs=3, n_train=40, metrics_path=str(path), test_every_steps=3)
    evaluated = slow_tests(t, 0.2)
    start = time.perf_counter()
    t.fit()
    elapsed = time.perf_counter() - start
    records = read_metrics(path)
    tests = [r for r in records if r.get("kind") == "test"]
    assert [r["step"] for r in tests] == [3, 6, 9, 12] and evaluated == [3, 6, 9, 12]
    assert [r["epoch"] for r in tests] == [0, 1, 2, 2]
    assert [r["epochs_done"] for r in tests] == [0.75, 1.5, 2.25, 3.0]
    times = [r["train_time"] for r in tests]
    assert all(a < b for a, b in zip(times, times[1:], strict=False))
    # Four tests of >= 0.2 s each ran, none of it counted as training.
    assert 0 < times[-1] <= elapsed - 4 * 0.2
    assert t.train_time() == pytest.approx(times[-1], abs=0.05)
    assert all(r["wall_time"] - r["train_time"] >= 0.2 * (i + 1) for i, r in enumerate(tests))
    # Epoch records stay as they were: tested only after the last epoch, in the same order.
    epochs = [r for r in records if "kind" not in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2] and t.history == epochs
    assert ["test_accuracy" in r for r in epochs] == [False, False, True]
    assert epochs[2]["test_accuracy"] == tests[-1]["test_accuracy"]
    assert [r.get("kind", "epoch") for r in records] == ["test", "epoch", "test", "epoch", "test", "test", "epoch"]


def test_periodic_tests_call_no_hooks_and_leave_the_numbers_alone():
    calls, weights = [], []
    for every in (0, 1):
        rec = HookRecorder()
        t = make_trainer([rec, TimerCallback()], epochs=2, test_every_steps=every)
        history = t.fit()
        calls.append(rec.calls)
        weights.append(([r["train_objective"] for r in history], [p.clone() for p in t.model.parameters()]))
    assert calls[0] == calls[1]
    assert weights[0][0] == weights[1][0]
    assert all(torch.equal(a, b) for a, b in zip(weights[0][1], weights[1][1], strict=True))


def test_an_epoch_test_at_a_periodic_tests_step_reuses_it(tmp_path):
    # 2 steps an epoch: every periodic test is at an epoch end.
    t = make_trainer([TimerCallback()], epochs=2, metrics_path=str(tmp_path / "m.jsonl"), test_every_epoch=True,
                     test_every_steps=2)
    evaluated = slow_tests(t, 0.0)
    t.fit()
    assert evaluated == [2, 4]
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl") if r.get("kind") == "test"] == [2, 4]


def test_stop_at_test_accuracy_ends_the_run_mid_epoch_like_a_last_epoch(tmp_path):
    lines: list[str] = []
    rec = HookRecorder()
    t = make_trainer([rec, TimerCallback()], epochs=5, n_train=40, lines=lines, metrics_path=str(tmp_path / "m.jsonl"),
                     test_every_steps=3, stop_at_test_accuracy=98.0)
    slow_tests(t, 0.0, accuracies=[50.0, 97.9, 98.0, 10.0])
    history = t.fit()
    assert t.step == 9 and t.reached == 98.0
    assert [r["epoch"] for r in history] == [0, 1, 2] and history[-1]["step"] == 9
    assert history[-1]["test_accuracy"] == 98.0
    assert rec.calls.count("on_train_end") == 1 and rec.calls.count("on_test_begin") == 1
    assert rec.calls[-3:] == ["on_train_end", "on_test_begin", "on_test_end"]
    (stop,) = [line for line in lines if "stop_at_test_accuracy" in line]
    assert stop.startswith("trainer: test accuracy 98.00% >= trainer.stop_at_test_accuracy=98 at step 9 (epoch 2)")


def test_stop_at_test_accuracy_with_epoch_tests_only():
    lines: list[str] = []
    t = make_trainer([TimerCallback()], epochs=5, lines=lines, test_every_epoch=True, stop_at_test_accuracy=60.0)
    slow_tests(t, 0.0, accuracies=[10.0, 60.0, 10.0])
    history = t.fit()
    assert [r["test_accuracy"] for r in history] == [10.0, 60.0] and t.step == 4
    assert sum("stop_at_test_accuracy" in line for line in lines) == 1


def test_a_target_met_only_by_the_final_test_is_no_early_stop():
    lines: list[str] = []
    t = make_trainer([TimerCallback()], epochs=2, lines=lines, test_every_epoch=True, stop_at_test_accuracy=60.0)
    slow_tests(t, 0.0, accuracies=[10.0, 70.0])
    assert len(t.fit()) == 2 and t.reached == 70.0
    assert not any("stop_at_test_accuracy" in line for line in lines)


def test_test_records_and_the_clock_survive_a_checkpoint(tmp_path):
    t = make_trainer([TimerCallback()], epochs=2, test_every_steps=1)
    t.fit()
    resumed = make_trainer([TimerCallback()], epochs=3, metrics_path=str(tmp_path / "m.jsonl"))
    resumed.load_state_dict(t.state_dict(epoch_done=True))
    assert resumed.train_time() == pytest.approx(t.train_time())
    assert [(r["step"], r.get("kind", "epoch")) for r in read_metrics(tmp_path / "m.jsonl")] == [
        (1, "test"), (2, "test"), (2, "epoch"), (3, "test"), (4, "test"), (4, "epoch")]


@pytest.mark.parametrize("values,message", [
    ({"test_every_steps": -1}, "trainer.test_every_steps: must be >= 0 (0: off), got -1"),
    ({"stop_at_test_accuracy": 0.0, "test_every_steps": 5}, "trainer.stop_at_test_accuracy: must be a test accuracy"),
    ({"stop_at_test_accuracy": 101.0, "test_every_epoch": True}, "got 101.0"),
    ({"stop_at_test_accuracy": 98.0}, "trainer.stop_at_test_accuracy: needs trainer.test_every_steps > 0 or"),
])
def test_bad_values_name_their_key(values, message):
    errors = validate(config_with("trainer", **values))
    assert len(errors) == 1 and message in errors[0]


def test_good_values_pass():
    assert validate(config_with("trainer", test_every_steps=100, stop_at_test_accuracy=98.0)) == []
    assert validate(config_with("trainer", test_every_epoch=True, stop_at_test_accuracy=97.5)) == []


def test_kfac_py_rejects_a_bad_value_in_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), "trainer.test_every_steps=-5"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("trainer.test_every_steps: must be >= 0 (0: off), got -5")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """kfac.py at 1 and 2 ranks, started together (tests/support/jobs.py); ``runs.root / "<ranks>"``: their runs."""
    root = tmp_path_factory.mktemp("runs")
    jobs = Jobs(at_once=2, root=root)
    for ranks in (1, 2) if os.access(MPIEXEC, os.X_OK) else (1,):
        cmd = [sys.executable, str(ROOT / "kfac.py"), "--procs-per-node", str(ranks), "--num_epochs", "20",
               "data.max_train_samples=400", "data.max_test_samples=200", "trainer.num_threads=1",
               "trainer.test_every_steps=2", "trainer.stop_at_test_accuracy=10", "trainer.progress=false",
               f"launcher.experiment_dir={root / str(ranks)}"]
        jobs.start(str(ranks), cmd, cwd=ROOT, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    yield jobs
    jobs.close()


@pytest.mark.parametrize("ranks", [1, 2])
def test_kfac_py_stops_at_the_target_on_every_rank_with_exit_0(ranks, runs):
    if ranks > 1 and not os.access(MPIEXEC, os.X_OK):
        pytest.skip("needs the venv's mpiexec")
    result = runs.result(str(ranks))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "trainer: test accuracy " in result.stdout
    assert ">= trainer.stop_at_test_accuracy=10 at step 2 (epoch 0)" in result.stdout
    (work_dir,) = (runs.root / str(ranks)).iterdir()
    records = read_metrics(work_dir / "metrics.jsonl")
    assert [(r.get("kind", "epoch"), r["step"]) for r in records] == [("test", 2), ("epoch", 2)]
    assert records[0]["test_accuracy"] >= 10 and records[1]["test_accuracy"] == records[0]["test_accuracy"]
