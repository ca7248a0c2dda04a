"""The autoencoder through the whole trainer on real MNIST: LBANN's lines with the reconstruction
error, the records, the full-train objective against the formula by hand; the adaptive rules
resumed from a checkpoint give the uninterrupted run's weights bit for bit; real MPI ranks give
one rank's weights with every rule on (docs/algorithm.md §2, §9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from models import build_model
from tests.support.data import real_mnist
from tests.support.jobs import Jobs
from tests.support.rank_jobs import COMMON, log_of, max_relative_difference, start
from trainer.checkpoint import load_checkpoint, newest_checkpoint
from trainer.config import Config, validate
from trainer.run import train

ROOT = Path(__file__).resolve().parent.parent.parent
ConfigStore.instance().store(name="schema", node=Config)
SMALL = ["model=autoencoder", "data.max_train_samples=60", "data.max_test_samples=20", "trainer.mini_batch_size=20",
         "trainer.progress=false", "trainer.num_threads=1", "trainer.epochs=1"]
# Every rule on, the damping adapted every second step; inverses every step.
RULES = ["experiment=kfac_adaptive", "kfac.damping_adaptation_interval=2", "kfac.compute_interval_steps=1"]


def run(tmp: Path, *overrides: str) -> None:
    threads = torch.get_num_threads()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*SMALL, *overrides])
        train(cfg, str(tmp))
    finally:
        torch.set_num_threads(threads)


def records(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]


def test_autoencoder_lines_records_and_objective_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run(tmp_path, "trainer.test_every_steps=3", "trainer.full_train_objective=true")
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("model0 (instance 0) training epoch 0 mean squared error : ") for line in lines)
    assert any(line.startswith("model0 (instance 0) test mean squared error : ") for line in lines)
    assert not any("accuracy" in line for line in lines), [line for line in lines if "accuracy" in line]
    recs = records(tmp_path)
    test = [r for r in recs if r.get("kind") == "test"][-1]
    epoch = [r for r in recs if "kind" not in r][-1]
    assert {"train_mse", "test_mse"} <= set(epoch) and "train_accuracy" not in epoch
    assert {"train_objective_full", "train_mse_full", "test_mse", "train_time"} <= set(test)
    # The objective and error of the final weights over the 60 training images, by hand.
    model = build_model("autoencoder")
    model.load_state_dict(load_checkpoint(newest_checkpoint(tmp_path))["model"])
    data = real_mnist(60, 20)
    x = data.train_x.flatten(1).double()
    model = model.double().eval()
    with torch.no_grad():
        logits = model(x)
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
        l2 = 0.5 * 1e-5 * sum((p.double() ** 2).sum() for p in model.parameters())
        mse = ((torch.sigmoid(logits) - x) ** 2).sum() / len(x)
    assert test["step"] == epoch["step"] == 3
    assert test["train_objective_full"] == pytest.approx(float(bce + l2), rel=1e-5)
    assert test["train_mse_full"] == pytest.approx(float(mse), rel=1e-4)


def test_autoencoder_refuses_an_accuracy_target_and_rules_without_sgd() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*SMALL, "trainer.test_every_steps=1",
                                                       "trainer.stop_at_test_accuracy=50", *RULES, "optimizer=adam"])
    errors = validate(cfg)
    assert any("no accuracy" in e for e in errors) and any("needs optimizer=sgd" in e for e in errors), errors


def test_adaptive_rules_resume_bit_for_bit(tmp_path: Path) -> None:
    run(tmp_path / "straight", *RULES, "trainer.epochs=2")
    run(tmp_path / "resumed", *RULES, "trainer.epochs=1")
    run(tmp_path / "resumed", *RULES, "trainer.epochs=2", f"trainer.resume={tmp_path / 'resumed'}")
    straight = load_checkpoint(newest_checkpoint(tmp_path / "straight"))
    resumed = load_checkpoint(newest_checkpoint(tmp_path / "resumed"))
    assert straight["step"] == resumed["step"] == 6
    for name, weight in straight["model"].items():
        assert torch.equal(weight, resumed["model"][name]), name
    final = [r for r in records(tmp_path / "resumed") if "kind" not in r][-1]
    assert final["kfac_lm_damping"] == [r for r in records(tmp_path / "straight") if "kind" not in r][-1]["kfac_lm_damping"]


# Slow: tests/kfac_callback/test_adaptive.py's 4 thread ranks (real collective semantics, uneven
# shares) give one rank's weights, λ, α and μ with the rules on, and tests/trainer/test_ranks.py
# proves the trainer's real MPI path, by default.
@pytest.mark.slow
def test_four_ranks_give_one_ranks_weights_with_every_rule_on(tmp_path: Path) -> None:
    """MLP, float64, 10 steps of 100 over 1, 2 and 4 real MPI ranks; the damping adapts every 2 steps."""
    overrides = ["model=mlp", *COMMON, "kfac.adapt_learning_rate=true", "kfac.adapt_momentum=true",
                 "kfac.adapt_damping=true", "kfac.use_pi=true", "kfac.damping_adaptation_interval=2",
                 "optimizer.learning_rate=1.0"]
    jobs = Jobs(at_once=2)  # independent: side by side
    start(jobs, tmp_path / "r1", 1, overrides, ["all"])
    start(jobs, tmp_path / "r4", 4, overrides, ["balanced"])
    log_of(jobs, tmp_path / "r1")
    log_of(jobs, tmp_path / "r4")
    jobs.close()
    reference = torch.load(tmp_path / "r1" / "all.pt")
    weights = torch.load(tmp_path / "r4" / "balanced.pt")
    assert max_relative_difference(weights, reference) < 1e-8


def test_a_training_budget_ends_the_run_with_a_last_test(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """trainer.max_train_seconds: the step that spends it is tested (the curve's last point), then the run ends."""
    run(tmp_path, "trainer.test_every_steps=100", "trainer.max_train_seconds=1e-9", "trainer.full_train_objective=true")
    tests = [r for r in records(tmp_path) if r.get("kind") == "test"]
    assert [r["step"] for r in tests] == [1] and "train_objective_full" in tests[0]
    assert "trainer.max_train_seconds=1e-09 at step 1 (epoch 0); run stopped" in capsys.readouterr().out
