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
        "optimizer.name: 'lbfgs' is not one of momentum, sgd, adam, adamw, adagrad, rmsprop",
        "optimizer.learning_rate: must be > 0, got 0"]


@pytest.mark.parametrize("name", ["momentum", "sgd", "adam", "adamw", "adagrad", "rmsprop"])
def test_weight_decay_reaches_every_optimizer_and_defaults_to_none(name):
    param = [torch.nn.Parameter(torch.zeros(2))]
    assert build_optimizer(OptimizerConfig(name=name), param).param_groups[0]["weight_decay"] == 0
    assert build_optimizer(OptimizerConfig(name=name, weight_decay=5e-4), param).param_groups[0]["weight_decay"] == 5e-4


def test_plain_sgd_weight_decay_shrinks_the_weights_by_lr_times_decay():
    weight = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1, weight_decay=0.5), [weight])
    weight.grad = torch.zeros(3)
    opt.step()
    assert torch.allclose(weight.detach(), torch.full((3,), 1 - 0.1 * 0.5))


def test_negative_weight_decay_is_refused():
    assert validate_optimizer(OptimizerConfig(weight_decay=-1e-4)) == [
        "optimizer.weight_decay: must be >= 0, got -0.0001"]
