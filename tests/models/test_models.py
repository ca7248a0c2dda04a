from __future__ import annotations

import math

import pytest
import torch

from models import build_model


def test_mlp_layers_shapes_and_parameter_count():
    torch.manual_seed(0)
    model = build_model("mlp")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {"ip1.weight": (1000, 784), "ip2.weight": (1000, 1000), "ip3.weight": (10, 1000)}
    assert sum(p.numel() for p in model.parameters()) == 784 * 1000 + 1000 * 1000 + 1000 * 10
    assert model(torch.zeros(7, 1, 28, 28)).shape == (7, 10)


def test_cnn_layers_shapes_and_parameter_count():
    torch.manual_seed(0)
    model = build_model("cnn")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {"conv1.weight": (20, 1, 5, 5), "conv2.weight": (50, 20, 5, 5),
                      "ip1.weight": (500, 800), "ip2.weight": (10, 500)}
    assert sum(p.numel() for p in model.parameters()) == 500 + 25000 + 400000 + 5000
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name,layer,variance", [
    ("mlp", "ip1", 1 / 784), ("mlp", "ip2", 1 / 1000), ("mlp", "ip3", 1 / 1000),
    ("cnn", "conv1", 2 / 25), ("cnn", "conv2", 2 / 500), ("cnn", "ip1", 1 / 800), ("cnn", "ip2", 1 / 500),
])
def test_init_is_lecun_normal_for_fc_and_he_normal_for_conv(name, layer, variance):
    torch.manual_seed(0)
    w = getattr(build_model(name), layer).weight.detach().double().flatten()
    n = w.numel()
    # The sample mean and variance of n normal draws are within a few standard errors.
    assert abs(w.mean().item()) < 5 * math.sqrt(variance / n)
    assert abs(w.var().item() / variance - 1) < 5 * math.sqrt(2 / n)


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = build_model("cnn").state_dict()
    torch.manual_seed(3)
    b = build_model("cnn").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'foo'; choose one of: mlp, cnn"):
        build_model("foo")
