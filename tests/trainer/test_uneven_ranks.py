"""The trainer on thread ranks whose shares of a batch differ, or are empty: one rank's weights.

The loop end to end (shares to the gradient weights and to K-FAC, an empty share's zero
loss, the epoch's statistics and the test set), in float64 (docs/algorithm.md §6). Real MPI
ranks are in test_ranks.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from kfac_callback import KFACCallback
from kfac_callback.base import SingleProcess
from models import build_model
from tests.support.data import tiny_data
from tests.support.threads import ThreadComm, run_ranks
from trainer.trainer import Trainer

D = torch.float64


def data64(n_train: int, n_test: int) -> Any:
    data = tiny_data(n_train, n_test)
    data.train_x, data.test_x = data.train_x.to(D), data.test_x.to(D)
    return data


def fit(model: torch.nn.Module, data: Any, batch: int, comm: Any, kfac: dict[str, Any] | None) -> dict[str, Any]:
    callbacks = [KFACCallback(model, printer=lambda s: None, **kfac)] if kfac is not None else []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(model, opt, data, epochs=2, mini_batch_size=batch, callbacks=callbacks, comm=comm,
                      device=torch.device("cpu"), seed=3, test_every_epoch=True, log=lambda line: None)
    history = trainer.fit()
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "history": [(r["train_objective"], r["train_accuracy"], r["test_objective"], r["test_accuracy"])
                        for r in history]}


@pytest.mark.parametrize(("n_train", "batch", "kfac"), [
    (25, 10, None),                                # shares 4, 3, 3; last batch 5: 2, 2, 1
    (25, 10, {"damping_act": 0.01, "damping_err": 0.1}),
    (25, 10, {"damping_act": 0.01, "damping_err": 0.1, "skip_weight_grad": True}),
    (5, 2, None),                                  # rank 2 never has a sample: 1, 1, 0; last 1, 0, 0
    (5, 2, {"damping_act": 0.01, "damping_err": 0.1}),  # (every MLP layer through the batch)
])
def test_three_ranks_with_uneven_shares_give_one_ranks_training(n_train, batch, kfac) -> None:
    torch.manual_seed(0)
    base = build_model("mlp").to(D)
    models = [copy.deepcopy(base) for _ in range(4)]  # before the threads: no shared RNG
    data = data64(n_train, 7)  # 7 test samples: 3, 2, 2 a rank at batch 10; 1, 1, 0 at 2
    want = fit(models[3], data, batch, SingleProcess(), kfac)
    ranks = run_ranks(3, lambda comm: fit(models[comm.rank], data, batch, comm, kfac))
    initial = {n: p.detach() for n, p in base.named_parameters()}
    moved = max(float((want["weights"][n] - p).norm() / p.norm()) for n, p in initial.items())
    assert moved > 1e-4
    for got in ranks:
        worst = max(float((got["weights"][n] - w).norm() / w.norm()) for n, w in want["weights"].items())
        assert worst < 1e-9, worst
        for a, b in zip(got["history"], want["history"], strict=True):
            assert a == pytest.approx(b, rel=1e-9)


def test_a_rank_without_samples_still_fires_the_kfac_hooks() -> None:
    """Its zero loss reaches every layer's output: the callback captures every layer, rows 0."""
    torch.manual_seed(0)
    base = build_model("cnn").to(D)
    models = [copy.deepcopy(base) for _ in range(3)]
    data = data64(2, 2)

    def rank_main(comm: ThreadComm) -> Any:
        seen = []

        class Spy(KFACCallback):
            def step(self, shares=None, learning_rate=None, batch=None):
                seen.append({n: (c.a.shape[0], c.g is not None and c.g.shape[0])
                             for n, c in self.capture.captures.items()})
                super().step(shares, learning_rate, batch)

        fit_model = models[comm.rank]
        spy = Spy(fit_model, printer=lambda s: None)
        opt = torch.optim.SGD(fit_model.parameters(), lr=0.1)
        Trainer(fit_model, opt, data, epochs=1, mini_batch_size=2, callbacks=[spy], comm=comm,
                device=torch.device("cpu"), seed=3, log=lambda line: None).fit()
        return seen

    seen = run_ranks(3, rank_main)
    layers = {"conv1", "conv2", "ip1", "ip2"}
    assert seen[0] == [{n: (1, 1) for n in layers}]
    assert seen[2] == [{n: (0, 0) for n in layers}]
