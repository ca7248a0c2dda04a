"""Uneven shares: ranks holding different parts of a batch (one of them possibly none) give
one rank's factors, inverses and preconditioned gradients on the same global batch
(docs/algorithm.md §3, §6), on thread ranks, in float64."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_callback import KFACCallback
from kfac_callback.blocks import LinearBlock
from tests.kfac_callback.test_skip_weight_grad import Net
from tests.support.threads import ThreadComm, run_ranks

D = torch.float64
STEPS = 3
TOLERANCE = 1e-9


def conv_net() -> nn.Module:
    """Every layer the direct way at N = 100 (the batch route costs more)."""
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 2, 3, stride=2, padding=1), relu=nn.ReLU(), flat=nn.Flatten(),
        ip1=nn.Linear(32, 6), act=nn.Tanh(), ip2=nn.Linear(6, 3, bias=False))).to(D)


def wide_net() -> nn.Module:
    """fc1 goes through the batch at N = 100 (cheaper below N = 126); fc2 the direct way."""
    torch.manual_seed(2)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(160, 240, bias=False), act=nn.Tanh(),
                                     fc2=nn.Linear(240, 10))).to(D)


def shared_net() -> nn.Module:
    """l1 through the batch at N = 20; l2 runs twice, so skip_weight_grad rebuilds its plain gradient."""
    return Net(share=True).to(D)


class TinyTransformer(nn.Module):
    """Every block type of a transformer and of a modern CNN: an embedding, attention (swapped for
    ours by the callback), LayerNorm, Linear on tokens, a depthwise dilated Conv1d, GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(12, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.depthwise = nn.Conv1d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(tokens))
        x = self.norm(self.depthwise(x.transpose(1, 2)))
        return self.head(x.mean(dim=2))


def token_data(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(30 + step)
    return torch.randint(0, 12, (n, 5), generator=gen), torch.randint(0, 3, (n,), generator=gen)


def image_data(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + step)
    return torch.randn(n, 1, 8, 8, dtype=D, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def vector_data(width: int, classes: int) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
    def data(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(20 + step)
        return torch.randn(n, width, dtype=D, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    return data


# name: (model, data, global batch N, K-FAC options)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], Any], int, dict[str, Any]]] = {
    "direct": (conv_net, image_data, 100, {}),
    "batch_route": (wide_net, vector_data(160, 10), 100, {}),
    "skip_weight_grad": (wide_net, vector_data(160, 10), 100, {"skip_weight_grad": True}),
    "skip_rebuilt": (shared_net, vector_data(30, 5), 20, {"skip_weight_grad": True}),
    "transformer": (lambda: TinyTransformer().to(D), token_data, 10, {}),
    "transformer_reduce": (lambda: TinyTransformer().to(D), token_data, 10, {"weight_sharing": "reduce"}),
}


def shares_of(kind: str, n: int) -> list[int]:
    """[34, 33, 33] for N = 100 ("even as it goes"), or an uneven split with an empty rank."""
    if kind == "split":
        return [n // 3 + (r < n % 3) for r in range(3)]
    return [n // 2 + n // 10, n - n // 2 - n // 10, 0]


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The local mean loss; a rank without samples takes part with a zero loss (no NaN)."""
    return F.cross_entropy(logits, y) if len(y) else logits.sum() * 0


def combine(model: nn.Module, comm: ThreadComm, shares: list[int]) -> None:
    """The trainer's combination of the gradients backward left: weights n_r/N."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for g in grads:
        g.mul_(shares[comm.rank])
    comm.allreduce_sum_(grads)
    for g in grads:
        g /= sum(shares)


def train(model: nn.Module, cb: KFACCallback, data: Callable, n: int, shares: list[int] | None,
          rank: int = 0, comm: ThreadComm | None = None) -> list[dict[str, Any]]:
    """STEPS steps of K-FAC and SGD; per step the preconditioned gradients and the factors."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = []
    for step in range(STEPS):
        x, y = data(step, n)
        if shares is not None:
            start = sum(shares[:rank])
            x, y = x[start:start + shares[rank]], y[start:start + shares[rank]]
            cb.expect_shares(shares)
        opt.zero_grad(set_to_none=True)
        loss_of(model(x), y).backward()
        if shares is not None:
            combine(model, comm, shares)
        cb.step(shares)
        record.append({"grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                       "factors": {name: [m.clone() for m in b.factors()] for name, b in cb.blocks.items()}})
        opt.step()
    return record


def inverses(cb: KFACCallback) -> dict[str, list[torch.Tensor]]:
    """The inverses each rank owns (Kronecker: A⁻¹, G⁻¹; BatchNorm: F⁻¹)."""
    return {name: [getattr(b, f"{f}_inv") for f in b.factor_names]
            for name, b in cb.blocks.items() if cb.owners[name] == cb.comm.rank and b.has_inverses}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def worst_difference(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> float:
    """The largest relative difference of any step's gradients or factors (float64 runs)."""
    worst = 0.0
    for step_got, step_want in zip(got, want, strict=True):
        for name, g in step_want["grads"].items():
            worst = max(worst, relative(step_got["grads"][name], g))
        for name, mats in step_want["factors"].items():
            for m_got, m_want in zip(step_got["factors"][name], mats, strict=True):
                worst = max(worst, relative(m_got, m_want))
    return worst


@pytest.mark.parametrize("kind", ["split", "empty_rank"])
@pytest.mark.parametrize("case", list(CASES))
def test_uneven_shares_give_one_ranks_factors_inverses_and_gradients(case: str, kind: str) -> None:
    build, data, n, options = CASES[case]
    shares = shares_of(kind, n)
    options = {"damping_act": 0.01, "damping_err": 0.1, "kronecker_decay": 0.7,
               "inverse_strategy": "balanced", "printer": lambda s: None, **options}
    base = build()
    models = [copy.deepcopy(base) for _ in range(4)]  # before the threads: no shared RNG
    ref_cb = KFACCallback(models[3], **options)
    want = train(models[3], ref_cb, data, n, None)
    want_inverses = inverses(ref_cb)

    def rank_main(comm: ThreadComm) -> Any:
        cb = KFACCallback(models[comm.rank], comm=comm, **options)
        got = train(models[comm.rank], cb, data, n, shares, comm.rank, comm)
        routes = {name: isinstance(b, LinearBlock) and b.batch_route_cheaper(n) for name, b in cb.blocks.items()}
        return got, inverses(cb), routes

    worst = 0.0
    owned = set()
    for got, got_inverses, routes in run_ranks(3, rank_main):
        # The cases take the routes they claim.
        assert any(routes.values()) == (case not in ("direct", "transformer", "transformer_reduce"))
        worst = max(worst, worst_difference(got, want))
        for name, mats in got_inverses.items():
            owned.add(name)
            for m_got, m_want in zip(mats, want_inverses[name], strict=True):
                worst = max(worst, relative(m_got, m_want))
    assert owned == set(want_inverses)  # every layer's inverses compared, on its owner
    print(f"{case} {shares}: max relative difference {worst:.2e}")
    assert worst < TOLERANCE


def test_equal_shares_take_the_path_of_no_shares_exactly() -> None:
    """step(shares=[n]*R) is step(): the same numbers, bit for bit."""
    options = {"damping_act": 0.01, "damping_err": 0.1, "printer": lambda s: None}
    base = wide_net()
    models = [copy.deepcopy(base) for _ in range(4)]

    def rank_main(comm: ThreadComm, shares: list[int] | None) -> Any:
        model = models[comm.rank + (2 if shares else 0)]
        cb = KFACCallback(model, comm=comm, **options)
        x, y = vector_data(160, 10)(0, 100)
        part = slice(50 * comm.rank, 50 * comm.rank + 50)
        F.cross_entropy(model(x[part]), y[part]).backward()
        grads = [p.grad for p in model.parameters()]
        comm.allreduce_sum_(grads)
        for g in grads:
            g /= 2
        cb.step(shares)
        return [p.grad.clone() for p in model.parameters()]

    plain = run_ranks(2, lambda comm: rank_main(comm, None))
    equal = run_ranks(2, lambda comm: rank_main(comm, [50, 50]))
    for a, b in zip(plain, equal, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_bad_shares_are_refused() -> None:
    cb = KFACCallback(wide_net(), printer=lambda s: None)
    with pytest.raises(ValueError, match="need one count >= 0 for each of the 1 ranks"):
        cb.step([3, 4])


def test_skip_weight_grad_needs_the_shares_before_the_forward() -> None:
    """Which layers skip their weight GEMM is decided in forward: step() refuses shares it did not expect."""
    base = wide_net()
    models = [copy.deepcopy(base) for _ in range(2)]

    def rank_main(comm: ThreadComm) -> None:
        cb = KFACCallback(models[comm.rank], comm=comm, skip_weight_grad=True, printer=lambda s: None)
        with pytest.raises(ValueError, match="call expect_shares with the step's shares before its forward"):
            cb.step([3, 2])

    run_ranks(2, rank_main)
