"""optimizer.warmup_steps / schedule: the rates against their formulas, the trainer setting them
before each step's hooks for every optimizer, the records, validation, and an exact resume."""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kfac_callback.base import Callback
from launcher.flags import SCHEDULES as FLAG_SCHEDULES
from tests.support.configs import config_with
from tests.support.trainers import make_trainer
from trainer.checkpoint import CheckpointPolicy, load_checkpoint
from trainer.config import validate
from trainer.lr_schedule import SCHEDULES, describe, learning_rate
from trainer.optimizers import OPTIMIZERS, OptimizerConfig

ROOT = Path(__file__).resolve().parent.parent.parent


def rates(cfg: OptimizerConfig, total: int, steps: int) -> list[float]:
    return [learning_rate(cfg, s, total) for s in range(steps)]


def test_warm_up_is_linear_from_base_over_w_to_base():
    cfg = OptimizerConfig(learning_rate=0.4, warmup_steps=4)
    assert rates(cfg, 100, 6) == [0.1, 0.2, pytest.approx(0.3), 0.4, 0.4, 0.4]
    assert rates(OptimizerConfig(learning_rate=0.4), 100, 3) == [0.4, 0.4, 0.4]  # the defaults: constant


def test_cosine_after_warm_up_reaches_the_floor_at_s_and_stays():
    cfg = OptimizerConfig(learning_rate=2.0, warmup_steps=2, schedule="cosine", schedule_steps=12,
                          final_lr_fraction=0.25)
    got = rates(cfg, 1000, 20)
    assert got[:2] == [1.0, 2.0]
    for s in range(2, 20):
        t = min(1.0, (s - 2) / 10)
        assert got[s] == pytest.approx(2.0 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * t))), abs=1e-15)
    assert got[2] == 2.0 and got[7] == pytest.approx(2.0 * (0.25 + 0.75 * 0.5))  # halfway: the mean
    assert got[12:] == [0.5] * 8  # the floor from step S on


def test_cosine_without_floor_ends_at_zero():
    cfg = OptimizerConfig(learning_rate=1.0, schedule="cosine", schedule_steps=4)
    assert rates(cfg, 0, 6) == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                              0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0, 0.0], abs=1e-15)


def test_step_multiplies_by_gamma_at_each_milestone_of_s():
    cfg = OptimizerConfig(learning_rate=1.0, schedule="step", schedule_steps=20, step_gamma=0.5,
                          step_milestones=[0.25, 0.5, 0.9])
    got = rates(cfg, 1000, 20)
    assert got == [1.0] * 5 + [0.5] * 5 + [0.25] * 8 + [0.125] * 2  # milestones at steps 5, 10, 18
    warm = OptimizerConfig(learning_rate=1.0, warmup_steps=2, schedule="step", schedule_steps=8)  # 0.1 at 4, 6
    assert rates(warm, 0, 8) == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_schedule_steps_0_is_the_whole_run():
    for schedule in ("cosine", "step"):
        whole = OptimizerConfig(learning_rate=1.0, warmup_steps=3, schedule=schedule)
        fixed = OptimizerConfig(learning_rate=1.0, warmup_steps=3, schedule=schedule, schedule_steps=40)
        assert rates(whole, 40, 45) == rates(fixed, 999, 45)
    assert learning_rate(OptimizerConfig(schedule="cosine"), 40, 40) == 0.0


class LRAtBackward(Callback):
    """What the K-FAC callback would see: the rate at on_backward_prop_end, per step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_backward_prop_end(self, trainer) -> None:
        self.seen.append((trainer.step, trainer.optimizer.param_groups[0]["lr"]))
        assert {g["lr"] for g in trainer.optimizer.param_groups} == {self.seen[-1][1]}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_with_the_scheduled_rate_set_before_backward(name, tmp_path):
    cfg = OptimizerConfig(name=name, learning_rate=0.01, warmup_steps=3, schedule="cosine", final_lr_fraction=0.1)
    seen = LRAtBackward()
    # 4 steps an epoch, 3 epochs: the horizon is the run's 12 steps.
    t = make_trainer([seen], epochs=3, n_train=40, optimizer=name, metrics_path=str(tmp_path / "m.jsonl"),
                     lr_schedule=functools.partial(learning_rate, cfg))
    history = t.fit()
    assert seen.seen == [(s, learning_rate(cfg, s, 12)) for s in range(12)]
    assert seen.seen[0][1] == pytest.approx(0.01 / 3) and seen.seen[-1][1] > 0.001
    # Each epoch record carries the rate of its last step.
    assert [r["learning_rate"] for r in history] == [learning_rate(cfg, s, 12) for s in (3, 7, 11)]


def test_the_step_actually_uses_the_scheduled_rate():
    # Plain SGD: the first update is -lr * gradient, with lr the warm-up's first rate, base / 4.
    cfg = OptimizerConfig(name="sgd", learning_rate=0.01, warmup_steps=4)
    t = make_trainer(optimizer="sgd", n_train=10, lr_schedule=functools.partial(learning_rate, cfg))
    before = t.model.ip3.weight.detach().clone()
    grads = {}
    t.callbacks.append(type("Grab", (Callback,), {"on_optimize_begin": lambda self, tr: grads.update(
        g=tr.model.ip3.weight.grad.clone())})())
    t.fit()
    assert torch.allclose(t.model.ip3.weight.detach(), before - 0.0025 * grads["g"], atol=1e-7)


def test_a_run_resumed_mid_epoch_continues_the_schedule_exactly(tmp_path):
    cfg = OptimizerConfig(name="momentum", learning_rate=0.01, warmup_steps=3, schedule="cosine",
                          final_lr_fraction=0.05)

    def run(work_dir: Path, epochs: int = 3):
        policy = CheckpointPolicy(str(work_dir / "checkpoints"), every_steps=1, keep=20, work_dir=str(work_dir))
        return make_trainer(epochs=epochs, n_train=40, optimizer="momentum", dtype=torch.float64, checkpoint=policy,
                            metrics_path=str(work_dir / "metrics.jsonl"),
                            lr_schedule=functools.partial(learning_rate, cfg))

    uninterrupted = run(tmp_path / "ref")
    uninterrupted.fit()
    # Step 6 is mid-epoch (4 steps an epoch), past the warm-up, inside the cosine decay.
    saved = load_checkpoint(tmp_path / "ref" / "checkpoints" / "step_000006.pt")
    assert (saved["epoch"], saved["batch"]) == (1, 2)
    resumed = run(tmp_path / "resumed")
    resumed.load_state_dict(saved)
    history = resumed.fit()
    assert resumed.step == 12
    assert uninterrupted.model.ip1.weight.dtype == torch.float64
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert [r["learning_rate"] for r in history] == [r["learning_rate"] for r in uninterrupted.history]


@pytest.mark.parametrize("values,message", [
    ({"warmup_steps": -1}, "optimizer.warmup_steps: must be >= 0 (0: no warm-up), got -1"),
    ({"schedule": "linear"}, "optimizer.schedule: 'linear' is not one of constant, cosine, step"),
    ({"schedule_steps": -5}, "optimizer.schedule_steps: must be >= 0 (0: the whole run), got -5"),
    ({"schedule": "cosine", "warmup_steps": 10, "schedule_steps": 10},
     "optimizer.schedule_steps=10: must be > optimizer.warmup_steps=10"),
    ({"final_lr_fraction": 1.5}, "optimizer.final_lr_fraction: must be in [0, 1]"),
    ({"step_gamma": 0.0}, "optimizer.step_gamma: must be in (0, 1], got 0.0"),
    ({"step_milestones": [0.75, 0.5]}, "optimizer.step_milestones: must be increasing fractions"),
    ({"step_milestones": [0.5, 2.0]}, "got [0.5, 2.0]"),
])
def test_bad_schedule_values_name_their_key(values, message):
    errors = validate(config_with("optimizer", **values))
    assert len(errors) == 1 and message in errors[0], errors


def test_good_schedules_pass_and_the_flag_choices_match():
    assert validate(config_with("optimizer", warmup_steps=100, schedule="cosine", final_lr_fraction=0.1)) == []
    assert validate(config_with("optimizer", schedule="step", schedule_steps=1000, step_milestones=[0.3])) == []
    assert FLAG_SCHEDULES == SCHEDULES


def test_the_setup_line_says_the_schedule_only_when_there_is_one():
    assert describe(OptimizerConfig(), 100) == ""
    assert describe(OptimizerConfig(name="sgd", learning_rate=0.1, warmup_steps=5, schedule="step"), 100) == (
        "optimizer: sgd, learning rate schedule step: base 0.1, linear warm-up over 5 steps, x 0.1 at steps 50, 75")


def test_kfac_py_rejects_a_bad_schedule_in_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), "optimizer.schedule=linear"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("kfac.py: error: optimizer.schedule: 'linear' is not one of "
                                     "constant, cosine, step")
