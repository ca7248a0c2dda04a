"""trainer.accumulate_steps: k micro-batches a step give one batch's weights (docs/algorithm.md §3),
on real MNIST in float64: in-process on one rank, and on 2 real mpiexec ranks with skip_weight_grad
(torchrun: tests/test_torchrun.py)."""

from __future__ import annotations

import os

import pytest
import torch

from kfac_callback import KFACCallback
from tests.support.data import real_mnist
from tests.support.jobs import Jobs
from tests.support.rank_jobs import COMMON, MPIEXEC, log_of, max_relative_difference, start
from tests.support.trainers import make_trainer

TOLERANCE = 1e-9


def mnist(n: int = 300):
    data = real_mnist(n, 20)
    return type(data)(data.train_x.double(), data.train_y, data.test_x.double(), data.test_y)


@pytest.mark.parametrize("skip", [False, True])
def test_micro_batches_give_one_batchs_weights_on_one_rank(skip, one_thread):
    data = mnist()
    weights, lines = [], []
    for k in (1, 3):
        torch.manual_seed(0)
        trainer = make_trainer(data=data, batch=100, optimizer="sgd", accumulate_steps=k, lines=lines)
        trainer.model.double()
        cb = KFACCallback(trainer.model, damping_act=0.01, damping_err=1.0, inverse_dtype="float64",
                          skip_weight_grad=skip, printer=lambda s: None)
        trainer.callbacks.append(cb)
        cb.on_setup_end(trainer)
        assert cb.accumulate_steps == k  # read from the trainer
        trainer.fit()
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    worst = max_relative_difference(weights[1], weights[0])
    print(f"skip_weight_grad={skip}: 3 micro-batches vs 1 batch: {worst:.2e}")
    assert worst < TOLERANCE


@pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK), reason="needs the venv's mpiexec")
def test_micro_batches_with_skip_weight_grad_on_two_ranks_give_one_ranks_weights(tmp_path):
    """1030 samples at batch 100: 2 ranks of 50 in micro-batches of 17, 17, 16; the last batch of
    30 in 5s; ip1 and ip2 skip their weight GEMM in every micro-batch."""
    overrides = ["model=mlp", *COMMON, "data.max_train_samples=1030"]
    jobs = Jobs(at_once=2)  # independent: side by side
    start(jobs, tmp_path / "r1", 1, overrides, ["all"])
    start(jobs, tmp_path / "r2", 2, [*overrides, "trainer.accumulate_steps=3", "kfac.skip_weight_grad=true"], ["balanced"])
    log_of(jobs, tmp_path / "r1")
    log_of(jobs, tmp_path / "r2")
    jobs.close()
    worst = max_relative_difference(torch.load(tmp_path / "r2" / "balanced.pt"), torch.load(tmp_path / "r1" / "all.pt"))
    print(f"2 ranks x 3 micro-batches, skip_weight_grad vs 1 rank: {worst:.2e}")
    assert worst < TOLERANCE
