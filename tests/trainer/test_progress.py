"""Progress bars: when they show (rank 0, a terminal, not a batch job), what they write, and that
the LBANN lines and logs stay clean."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.trainers import make_trainer
from trainer.observe.callbacks import PrintCallback, TimerCallback
from trainer.observe.progress import ProgressCallback, progress_enabled

ROOT = Path(__file__).resolve().parents[2]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


CASES = [  # setting, rank, tty, environment, shown
    ("auto", 0, True, {}, True),
    ("auto", 0, False, {}, False),  # stdout piped or redirected
    ("auto", 1, True, {}, False),  # other ranks never
    ("auto", 0, True, {"SLURM_JOB_ID": "42"}, False),  # inside a SLURM job, even under srun --pty
    ("auto", 0, False, {"KFAC_LAUNCHED": "1"}, False),
    ("auto", 0, True, {"KFAC_LAUNCHED": "1"}, True),
    ("true", 0, False, {"SLURM_JOB_ID": "42"}, True),  # forced
    (True, 0, False, {}, True),  # Hydra's trainer.progress=true may arrive as a bool or "True"
    ("True", 0, False, {}, True),
    ("true", 3, True, {}, False),  # forced, but still rank 0 only
    ("false", 0, True, {}, False),
    (False, 0, True, {}, False),
]


@pytest.mark.parametrize("setting,rank,tty,environ,shown", CASES)
def test_progress_enabled(setting, rank, tty, environ, shown):
    assert progress_enabled(setting, rank=rank, tty=tty, environ=environ) is shown


def test_an_unknown_setting_names_the_key():
    with pytest.raises(ValueError, match="trainer.progress: 'sometimes' is not one of auto, true, false"):
        progress_enabled("sometimes", rank=0, tty=True, environ={})


def test_auto_needs_the_bar_stream_and_stdout_to_be_terminals(monkeypatch):
    monkeypatch.setattr(sys, "stdout", FakeTTY())
    assert ProgressCallback.from_setting("auto", 0, stream=FakeTTY(), environ={}).enabled
    assert not ProgressCallback.from_setting("auto", 0, stream=io.StringIO(), environ={}).enabled
    assert not ProgressCallback.from_setting("auto", 0, stream=FakeTTY(), environ={"SLURM_JOB_ID": "7"}).enabled
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # e.g. stdout redirected in-process
    assert not ProgressCallback.from_setting("auto", 0, stream=FakeTTY(), environ={}).enabled


pytestmark = pytest.mark.usefixtures("one_thread")


def test_forced_progress_draws_epoch_and_batch_bars_on_the_given_stream():
    stream = io.StringIO()
    assert ProgressCallback.from_setting("true", 0, stream=stream, environ={}).enabled
    progress = ProgressCallback(True, stream, mininterval=0)  # every update drawn: no timing in the test
    lines: list[str] = []
    trainer = make_trainer([TimerCallback(), PrintCallback(), progress], epochs=2, n_train=30, optimizer="sgd",
                           log=progress.wrap(lines.append))
    trainer.fit()
    text = stream.getvalue()
    assert "\r" in text
    for piece in ("epochs:   0%", "0/2 [", "epoch 0:", "epoch 1:", "3/3 [", "batch/s", "loss=", "epochs: 100%"):
        assert piece in text, piece
    # Bars are not left behind (leave=False): the stream ends with a cleared line.
    assert text.rstrip(" ").endswith("\r")
    # The LBANN lines go to the log function unchanged, not to the bar stream.
    assert any(line.startswith("model0 (instance 0) training epoch 1 objective function : ") for line in lines)
    assert not any("\r" in line or "batch/s" in line for line in lines)
    assert "model0" not in text


def test_a_disabled_callback_draws_nothing_and_leaves_the_log_function_alone():
    stream = io.StringIO()
    progress = ProgressCallback(False, stream)
    lines: list[str] = []
    assert progress.wrap(lines.append) == lines.append
    make_trainer([TimerCallback(), PrintCallback(), progress], epochs=2, n_train=30, optimizer="sgd", lines=lines).fit()
    assert stream.getvalue() == ""
    assert lines


def kfac(*args: str) -> SimpleNamespace:
    # Bytes, not text=True: universal newlines would turn the bars' "\r" into "\n".
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), *args], capture_output=True, cwd=ROOT, timeout=300)
    return SimpleNamespace(returncode=result.returncode, stdout=result.stdout.decode(), stderr=result.stderr.decode())


def test_trainer_progress_true_forces_bars_onto_stdout_but_not_into_out_log(tmp_path):
    result = kfac("--num_epochs", "1", "data.max_train_samples=300", "data.max_test_samples=100",
                  "trainer.num_threads=1", "trainer.progress=true", f"launcher.experiment_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "\r" in result.stdout and "batch/s" in result.stdout
    # Every LBANN line still comes out whole, on a line of its own.
    pieces = [p.strip() for line in result.stdout.split("\n") for p in line.split("\r")]
    assert "model0 (instance 0) training epoch 0 accuracy : " in "\n".join(pieces)
    assert any(p.startswith("model0 (instance 0) test accuracy : ") and p.endswith("%") for p in pieces)
    (work_dir,) = tmp_path.iterdir()
    out_log = (work_dir / "out.log").read_bytes().decode()
    assert "model0 (instance 0) test accuracy : " in out_log
    assert "\r" not in out_log and "batch/s" not in out_log


def test_a_bad_progress_value_is_refused_at_compose_time():
    result = kfac("trainer.progress=sometimes")
    assert result.returncode == 2
    assert "trainer.progress: 'sometimes' is not one of auto, true, false" in result.stderr
