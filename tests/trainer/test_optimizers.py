from __future__ import annotations

import pytest
import torch

from trainer.optimizers import OptimizerConfig, build_optimizer, validate_optimizer


@pytest.mark.parametrize("name,cls,expected", [
    ("momentum", torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
    ("sgd", torch.optim.SGD, {"momentum": 0}),
    ("adam", torch.optim.Adam, {"betas": (0.9, 0.99), "eps": 1e-8}),
    ("adagrad", torch.optim.Adagrad, {"eps": 1e-8}),
    ("rmsprop", torch.optim.RMSprop, {"alpha": 0.99, "eps": 1e-8}),
])
def test_lbanns_five_optimizers_with_lbanns_hyperparameters(name, cls, expected):
    opt = build_optimizer(OptimizerConfig(name=name, learning_rate=0.05), [torch.nn.Parameter(torch.zeros(2))])
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.05
    for key, value in expected.items():
        assert group[key] == value


def test_bad_optimizer_config_names_the_keys():
    assert validate_optimizer(OptimizerConfig(name="lbfgs", learning_rate=0)) == [
        "optimizer.name: 'lbfgs' is not one of momentum, sgd, adam, adagrad, rmsprop",
        "optimizer.learning_rate: must be > 0, got 0"]
