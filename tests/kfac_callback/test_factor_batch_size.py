"""kfac.factor_batch_size: factors from the first samples of each rank's share, against dense
float64 formulas with M in place of N; R ranks against one rank on the same rows; a limit of
at least N is the default exactly (docs/algorithm.md §3, "Subsampled factors")."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_callback import KFACCallback
from kfac_callback.estimation.subsample import subsample_shares
from tests.kfac_callback.test_uneven_shares import (
    STEPS,
    conv_net,
    image_data,
    relative,
    train,
    vector_data,
    wide_net,
    worst_difference,
)
from tests.support.threads import ThreadComm, run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: several threads only thrash

D = torch.float64
OPTIONS = {"damping_act": 0.01, "damping_err": 0.1, "kronecker_decay": 0.7, "printer": lambda s: None}


def bn_net() -> nn.Module:
    """A convolution with bias, BatchNorm, a fully connected layer with bias and one without."""
    torch.manual_seed(3)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 3, 3, stride=2, padding=1), bn=nn.BatchNorm2d(3), relu=nn.ReLU(), flat=nn.Flatten(),
        ip1=nn.Linear(48, 7), act=nn.Tanh(), ip2=nn.Linear(7, 4, bias=False))).to(D)


def test_subsample_split_is_proportional_and_deterministic() -> None:
    assert subsample_shares([13] * 4 + [12] * 4, 50) == (7, 7, 6, 6, 6, 6, 6, 6)
    assert subsample_shares([7, 4, 1], 5) == (3, 2, 0)
    assert subsample_shares([4, 4, 4], 5) == (2, 2, 1)
    assert subsample_shares([60, 0, 40], 10) == (6, 0, 4)
    assert subsample_shares([4, 4], 0) is None and subsample_shares([4, 4], 8) is None
    for counts in ([5, 3, 0, 9], [1, 1, 1], [100]):
        for m in range(1, sum(counts)):
            split = subsample_shares(counts, m)
            assert sum(split) == m and all(0 <= k <= n for k, n in zip(split, counts, strict=True))


def test_subsampled_factors_equal_the_dense_formula_on_those_rows() -> None:
    """One step at N = 12, M = 5: A = (1/M) Σ ā āᵀ, G = M Σ e' e'ᵀ, e' = e·N/M, over the first M
    samples (a convolution: all their positions; BatchNorm: x̂ over the whole batch)."""
    n, m = 12, 5
    model = bn_net()
    cb = KFACCallback(model, factor_batch_size=m, **OPTIONS)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            out.retain_grad()
            seen[name] = (args[0].detach(), out)
        return hook

    for name in ("conv", "bn", "ip1", "ip2"):
        getattr(model, name).register_forward_hook(keep(name))
    x, y = image_data(0, n)
    x = x.to(D)
    F.cross_entropy(model(x), y).backward()
    cb.step()
    e = {name: out.grad[:m] * n / m for name, (_, out) in seen.items()}  # e' of the first M samples
    a = {name: inp[:m] for name, (inp, _) in seen.items()}
    ones = torch.ones(m, 1, dtype=D)
    want = {
        "ip1": [torch.cat([a["ip1"], ones], 1).mT @ torch.cat([a["ip1"], ones], 1) / m, m * e["ip1"].mT @ e["ip1"]],
        "ip2": [a["ip2"].mT @ a["ip2"] / m, m * e["ip2"].mT @ e["ip2"]],
    }
    conv = model.conv
    patches = F.unfold(a["conv"], conv.kernel_size, padding=conv.padding, stride=conv.stride).transpose(1, 2)
    p = torch.cat([patches.reshape(-1, patches.shape[2]), torch.ones(patches.shape[0] * patches.shape[1], 1,
                                                                     dtype=D)], 1)
    positions = e["conv"].shape[2] * e["conv"].shape[3]
    ec = e["conv"].permute(0, 2, 3, 1).reshape(-1, 3)
    want["conv"] = [p.mT @ p / m, (m / positions) * ec.mT @ ec]
    full = seen["bn"][0]
    xhat = ((full - full.mean((0, 2, 3), keepdim=True))
            / torch.sqrt(full.var((0, 2, 3), unbiased=False, keepdim=True) + model.bn.eps))[:m]
    u = torch.cat([(e["bn"] * xhat).sum((2, 3)), e["bn"].sum((2, 3))], 1)
    want["bn"] = [m * u.mT @ u]
    worst = max(relative(got, w) for name, mats in want.items()
                for got, w in zip(cb.blocks[name].factors(), mats, strict=True))
    print(f"subsample M={m} of N={n}: max relative difference to the dense formulas {worst:.2e}")
    assert worst < 1e-12


@pytest.mark.parametrize("limit", [12, 20])
def test_a_limit_of_at_least_n_is_the_default_exactly(limit: int) -> None:
    base = bn_net()
    runs = []
    for options in ({}, {"factor_batch_size": limit}):
        model = copy.deepcopy(base)
        runs.append(train(model, KFACCallback(model, **OPTIONS, **options), image_data, 12, None))
    for got, want in zip(*runs, strict=True):
        assert all(torch.equal(got["grads"][k], g) for k, g in want["grads"].items())
        assert all(torch.equal(p, q) for k, mats in want["factors"].items()
                   for p, q in zip(got["factors"][k], mats, strict=True))


CASES = {"direct": (conv_net, image_data), "batch_route": (wide_net, vector_data(160, 10))}


@pytest.mark.parametrize("shares", [[34, 33, 33], [60, 40, 0]])
@pytest.mark.parametrize("case", list(CASES))
def test_ranks_equal_one_rank_on_the_same_subsample(case: str, shares: list[int]) -> None:
    """3 thread ranks, each its first m_r rows, against 1 rank whose batch has those rows first."""
    build, data = CASES[case]
    n, limit = 100, 30
    split = subsample_shares(shares, limit)
    starts = [sum(shares[:r]) for r in range(3)]
    chosen = torch.tensor([starts[r] + i for r in range(3) for i in range(split[r])])
    rest = torch.tensor([i for i in range(n) if i not in set(chosen.tolist())])
    order = torch.cat([chosen, rest])

    def reordered(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data(step, size)
        return x[order], y[order]

    base = build()
    models = [copy.deepcopy(base) for _ in range(4)]
    options = {**OPTIONS, "factor_batch_size": limit, "inverse_strategy": "balanced"}
    want = train(models[3], KFACCallback(models[3], **options), reordered, n, None)

    def rank_main(comm: ThreadComm) -> Any:
        cb = KFACCallback(models[comm.rank], comm=comm, **options)
        return train(models[comm.rank], cb, data, n, shares, comm.rank, comm)

    worst = 0.0
    for got in run_ranks(3, rank_main):
        assert len(got) == STEPS
        worst = max(worst, worst_difference(got, want))
    print(f"{case} {shares} M={limit} ({split}): max relative difference 3 ranks vs 1 {worst:.2e}")
    assert worst < 1e-9
