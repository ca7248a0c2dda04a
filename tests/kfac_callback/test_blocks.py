"""Blocks against dense formulas: factors from per-sample quantities, preconditioning via kron."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from kfac_callback.blocks import (
    BatchNormBlock,
    ConvBlock,
    Dampings,
    LinearBlock,
)

D = torch.float64


def per_sample_loss(out_i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A smooth per-sample loss of a layer's output (any shape)."""
    return (torch.tanh(out_i) * w).sum() + 0.5 * (out_i ** 2 * w.abs()).sum()


def per_sample_output_grads(out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """d loss_i / d out_i for every sample, by torch.func."""
    return vmap(grad(per_sample_loss), in_dims=(0, None))(out.detach(), w)


def local_grad_output(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What a backward hook sees: the gradient of the LOCAL mean loss w.r.t. the output."""
    out = layer(x)
    loss = torch.stack([per_sample_loss(o, w) for o in out]).mean()
    (g,) = torch.autograd.grad(loss, out)
    return g


# -- fully connected ---------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_equal_definitions(bias: bool) -> None:
    torch.manual_seed(0)
    n, din, dout = 6, 4, 3
    layer = nn.Linear(din, dout, bias=bias, dtype=D)
    x = torch.randn(n, din, dtype=D)
    w = torch.randn(dout, dtype=D)
    per_sample = per_sample_output_grads(layer(x), w)  # N·e_i
    big_a = torch.zeros(din + bias, din + bias, dtype=D)
    big_g = torch.zeros(dout, dout, dtype=D)
    for i in range(n):
        abar = torch.cat([x[i], torch.ones(1, dtype=D)]) if bias else x[i]
        e = per_sample[i] / n
        big_a += torch.outer(abar, abar) / n
        big_g += n * torch.outer(e, e)
    block = LinearBlock("fc", layer)
    a_got, g_got = block.contributions(x, local_grad_output(layer, x, w), n)
    torch.testing.assert_close(a_got, big_a)
    torch.testing.assert_close(g_got, big_g)
    # Two ranks holding halves, each with its local mean loss, sum to the same factors.
    halves = [block.contributions(x[s], local_grad_output(layer, x[s], w), n)
              for s in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(halves[0][0] + halves[1][0], big_a)
    torch.testing.assert_close(halves[0][1] + halves[1][1], big_g)


# -- convolution -------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (2, 1)])
def test_conv_factors_equal_definitions(bias: bool, stride: int, padding: int) -> None:
    torch.manual_seed(1)
    n, cin, cout, k, hw = 4, 2, 3, 3, 6
    layer = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias, dtype=D)
    x = torch.randn(n, cin, hw, hw, dtype=D)
    w = torch.randn(cout, 1, 1, dtype=D)
    out = layer(x)
    per_sample = per_sample_output_grads(out, w)  # N·e_{i,t}, (n, C_out, Ho, Wo)
    ho, wo = out.shape[2:]
    positions = ho * wo
    xpad = F.pad(x, (padding,) * 4)
    dim_a = cin * k * k + bias
    big_a = torch.zeros(dim_a, dim_a, dtype=D)
    big_g = torch.zeros(cout, cout, dtype=D)
    for i in range(n):
        for r in range(ho):
            for c in range(wo):
                patch = xpad[i, :, r * stride:r * stride + k, c * stride:c * stride + k].reshape(-1)
                if bias:
                    patch = torch.cat([patch, torch.ones(1, dtype=D)])
                e = per_sample[i, :, r, c] / n
                big_a += torch.outer(patch, patch) / n
                big_g += (n / positions) * torch.outer(e, e)
    block = ConvBlock("conv", layer)
    a_got, g_got = block.contributions(x, local_grad_output(layer, x, w), n)
    torch.testing.assert_close(a_got, big_a)
    torch.testing.assert_close(g_got, big_g)
    halves = [block.contributions(x[s], local_grad_output(layer, x[s], w), n)
              for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(halves[0][0] + halves[1][0], big_a)
    torch.testing.assert_close(halves[0][1] + halves[1][1], big_g)


# -- batch norm --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 4), (4, 2, 3, 3)])
def test_batchnorm_factor_uses_normalised_input(shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    n, c = shape[0], shape[1]
    layer = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(c, dtype=D)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, dtype=D) + 0.5)
        layer.bias.copy_(torch.randn(c, dtype=D))
    layer.train()
    x = 3.0 * torch.randn(*shape, dtype=D) + 1.0
    w = torch.randn(c, *([1] * (len(shape) - 2)), dtype=D)
    per_sample = per_sample_output_grads(layer(x), w)
    xs = x.reshape(n, c, -1)
    gs = per_sample.reshape(n, c, -1) / n  # e_{i,c,s}
    big_f = torch.zeros(2 * c, 2 * c, dtype=D)
    grad_gamma = torch.zeros(c, dtype=D)
    for i in range(n):
        u = torch.zeros(2 * c, dtype=D)
        for ch in range(c):
            vals = xs[:, ch, :]
            mean = vals.mean()
            var = ((vals - mean) ** 2).mean()  # biased, as BatchNorm normalises in training
            xhat = (xs[i, ch] - mean) / torch.sqrt(var + layer.eps)
            u[ch] = (gs[i, ch] * xhat).sum()
            u[c + ch] = gs[i, ch].sum()
        big_f += n * torch.outer(u, u)
        grad_gamma += u[:c]
    block = BatchNormBlock("bn", layer)
    g_local = local_grad_output(layer, x, w)
    (f_got,) = block.contributions(x, g_local, n)
    torch.testing.assert_close(f_got, big_f)
    # Sanity of the convention: Σ_i u_i[:C] is PyTorch's own gradient of γ.
    out = layer(x)
    loss = torch.stack([per_sample_loss(o, w) for o in out]).mean()
    (gamma_grad,) = torch.autograd.grad(loss, layer.weight)
    torch.testing.assert_close(grad_gamma, gamma_grad)


# -- running average ---------------------------------------------------------------------


def test_running_average_first_takes_then_decays() -> None:
    block = LinearBlock("fc", nn.Linear(2, 2, bias=False, dtype=D))
    a1, g1 = torch.eye(2, dtype=D), 2 * torch.eye(2, dtype=D)
    a2, g2 = torch.ones(2, 2, dtype=D), torch.zeros(2, 2, dtype=D)
    assert block.update_factors([a1, g1], 0.9)
    torch.testing.assert_close(block.A, a1)
    assert block.update_factors([a2, g2], 0.9)
    torch.testing.assert_close(block.A, 0.9 * a1 + 0.1 * a2)
    torch.testing.assert_close(block.G, 0.9 * g1 + 0.1 * g2)
    # A non-finite new factor changes nothing.
    assert not block.update_factors([a2 * float("nan"), g2], 0.9)
    torch.testing.assert_close(block.A, 0.9 * a1 + 0.1 * a2)
    assert block.updates == 2


@pytest.mark.parametrize("make", [
    lambda: LinearBlock("fc", nn.Linear(5, 3, bias=True, dtype=D)),
    lambda: ConvBlock("conv", nn.Conv2d(2, 3, 3, padding=1, stride=2, dtype=D)),
])
def test_accumulate_equals_update_of_contributions(make) -> None:
    """One rank folds c·XᵀX in with one addmm_: the same running averages as forming the factors."""
    fused, plain = make(), make()
    plain.module.load_state_dict(fused.module.state_dict())
    torch.manual_seed(3)
    shape = (4, 5) if fused.kind == "linear" else (4, 2, 6, 6)
    for _ in range(3):
        a = torch.randn(shape, dtype=D)
        g = torch.randn(fused.module(a).shape, dtype=D)
        assert fused.accumulate(a, g, 4, 0.9)
        assert plain.update_factors(plain.contributions(a, g, 4), 0.9)
        torch.testing.assert_close(fused.A, plain.A)
        torch.testing.assert_close(fused.G, plain.G)
    kept = fused.A.clone()
    a[0, 0] = float("inf")
    assert not fused.accumulate(a, g, 4, 0.9)  # a non-finite batch changes nothing
    torch.testing.assert_close(fused.A, kept)
    assert fused.updates == 3


# -- preconditioned gradient -------------------------------------------------------------


def vec(m: torch.Tensor) -> torch.Tensor:
    """Column-major vec, so that vec(G X A) = (Aᵀ ⊗ G) vec(X)."""
    return m.mT.reshape(-1)


def spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n + 2, dtype=D, generator=gen)
    return m @ m.T / n


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("use_pi", [False, True])
@pytest.mark.parametrize("use_eigen", [False, True])
@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv"])
def test_preconditioned_gradient_equals_dense_kron_solve(kind: str, use_pi: bool,
                                                         use_eigen: bool, explicit: bool) -> None:
    torch.manual_seed(3)
    if kind == "conv":
        layer = nn.Conv2d(2, 3, 2, bias=True, dtype=D)
        block = ConvBlock("c", layer)
    else:
        layer = nn.Linear(4, 3, bias=kind == "linear", dtype=D)
        block = LinearBlock("l", layer)
    da, dg = block.factor_dims()
    big_a, big_g = spd(da, 1), spd(dg, 2)
    block.update_factors([big_a, big_g], 0.99)
    for p in block.parameters():
        p.grad = torch.randn_like(p)
    gm = layer.weight.grad.reshape(dg, -1)
    if layer.bias is not None:
        gm = torch.cat([gm, layer.bias.grad[:, None]], dim=1)
    lam_a, lam_g, f = 0.05, 0.2, 0.7
    pi = 1.0
    if use_pi:
        pi = ((big_a.trace() / da) / (big_g.trace() / dg)).sqrt()
    a_d = big_a + lam_a * pi * torch.eye(da, dtype=D)
    g_d = big_g + lam_g / pi * torch.eye(dg, dtype=D)
    expected = f * torch.linalg.solve(torch.kron(a_d, g_d), vec(gm))
    expected = expected.reshape(da, dg).mT  # un-vec (column-major) to C_out × in
    assert block.compute_inverses(Dampings(lam_a, lam_g, 9.0, 9.0), use_pi, use_eigen, D, explicit=explicit)
    assert block.precondition(f)
    got = layer.weight.grad.reshape(dg, -1)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, expected[:, -1])
        expected = expected[:, :-1]
    torch.testing.assert_close(got, expected)
    assert layer.weight.grad.shape == layer.weight.shape


@pytest.mark.parametrize("use_eigen", [False, True])
def test_batchnorm_preconditioned_gradient(use_eigen: bool) -> None:
    layer = nn.BatchNorm2d(3, dtype=D)
    block = BatchNormBlock("bn", layer)
    big_f = spd(6, 4)
    block.update_factors([big_f], 0.99)
    layer.weight.grad = torch.randn(3, dtype=D)
    layer.bias.grad = torch.randn(3, dtype=D)
    v = torch.cat([layer.weight.grad, layer.bias.grad])
    f_d = big_f + torch.diag(torch.tensor([0.1] * 3 + [0.3] * 3, dtype=D))
    expected = 2.0 * torch.linalg.solve(f_d, v)
    assert block.compute_inverses(Dampings(9.0, 9.0, 0.1, 0.3), use_eigen=use_eigen, dtype=D)
    assert block.precondition(2.0)
    torch.testing.assert_close(torch.cat([layer.weight.grad, layer.bias.grad]), expected)


def test_float32_layer_gets_requested_inverse_dtype_and_float64_keeps_float64() -> None:
    b32 = LinearBlock("a", nn.Linear(3, 2))
    b32.update_factors([spd(4, 5).float(), spd(2, 6).float()], 0.9)
    assert b32.A.dtype == torch.float32
    assert b32.compute_inverses(Dampings(0.1, 0.1, 0.1, 0.1), dtype=torch.float64)
    assert b32.A_inv.dtype == torch.float64
    b64 = LinearBlock("b", nn.Linear(3, 2, dtype=D))
    b64.update_factors([spd(4, 5), spd(2, 6)], 0.9)
    assert b64.compute_inverses(Dampings(0.1, 0.1, 0.1, 0.1), dtype=torch.float32)
    assert b64.A_inv.dtype == D


def test_no_inverses_means_plain_gradient() -> None:
    layer = nn.Linear(3, 2, dtype=D)
    block = LinearBlock("a", layer)
    layer.weight.grad = torch.ones(2, 3, dtype=D)
    layer.bias.grad = torch.ones(2, dtype=D)
    assert not block.compute_inverses(Dampings(0.1, 0.1, 0.1, 0.1))  # no factors yet
    assert not block.precondition(1.0)
    torch.testing.assert_close(layer.weight.grad, torch.ones(2, 3, dtype=D))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_eigen", [False, True])
def test_preconditioning_through_the_batch_equals_the_dense_kron_solve(bias: bool, use_eigen: bool) -> None:
    # N = 4 samples, 40 → 30: the batch route (G⁻¹gᵀ)([a|1]A⁻¹) is the cheaper one here.
    torch.manual_seed(5)
    layer = nn.Linear(40, 30, bias=bias, dtype=D)
    block = LinearBlock("l", layer)
    da, dg = block.factor_dims()
    big_a, big_g = spd(da, 3), spd(dg, 4)
    block.update_factors([big_a, big_g], 0.99)
    x = torch.randn(4, 40, dtype=D)
    out = layer(x)
    g_out = torch.randn_like(out) / 4
    out.backward(g_out)
    gm = layer.weight.grad.clone()
    if bias:
        gm = torch.cat([gm, layer.bias.grad[:, None]], dim=1)
    lam_a, lam_g = 0.05, 0.2
    a_d = big_a + lam_a * torch.eye(da, dtype=D)
    g_d = big_g + lam_g * torch.eye(dg, dtype=D)
    expected = torch.linalg.solve(torch.kron(a_d, g_d), vec(gm)).reshape(da, dg).mT
    assert block.compute_inverses(Dampings(lam_a, lam_g, 9.0, 9.0), False, use_eigen, D)
    block.set_batch(x, g_out)
    assert block._batch_product() is not None  # the batch route is the one taken
    block.set_batch(x, g_out)
    assert block.precondition(1.0)
    torch.testing.assert_close(layer.weight.grad, expected[:, :40])
    if bias:
        torch.testing.assert_close(layer.bias.grad, expected[:, -1])
