"""Gradient accumulation: k micro-batches of a step give one batch's factors, inverses and
preconditioned gradients (docs/algorithm.md §3), on 1 and 2 (thread) ranks, in float64, with
and without skip_weight_grad; and the loss scale of a GradScaler is divided out of them.

The real-rank versions (mpiexec, torchrun) are in tests/trainer/test_accumulate_ranks.py and
tests/test_torchrun.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kfac_callback import KFACCallback
from kfac_callback.blocks import LinearBlock
from tests.kfac_callback.test_uneven_shares import (
    conv_net,
    image_data,
    inverses,
    relative,
    vector_data,
    wide_net,
    worst_difference,
)
from tests.support.threads import ThreadComm, run_ranks

STEPS = 3
TOLERANCE = 1e-9
N = 100  # the global batch of every step
K = 3  # micro-batches: 34, 33, 33 of one rank's 100, or 17, 17, 16 of each of 2 ranks' 50

# name: (model, data, K-FAC options)
CASES = {
    "direct": (conv_net, image_data, {}),
    "batch_route": (wide_net, vector_data(160, 10), {}),
    "skip_weight_grad": (wide_net, vector_data(160, 10), {"skip_weight_grad": True}),
}
OPTIONS = {"damping_act": 0.01, "damping_err": 0.1, "kronecker_decay": 0.7, "inverse_strategy": "balanced",
           "printer": lambda s: None}


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def train(model: torch.nn.Module, cb: KFACCallback, data: Any, k: int, comm: ThreadComm | None = None,
          scaler: Any = None) -> list[dict[str, Any]]:
    """STEPS steps of SGD with K-FAC; each rank's share in k micro-batches, each loss its sum over
    the share's n (so the k backward passes add up to the share's mean loss)."""
    world, rank = (1, 0) if comm is None else (comm.world_size, comm.rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = []
    for step in range(STEPS):
        x, y = data(step, N)
        share = split(N, world)
        start = sum(share[:rank])
        x, y = x[start:start + share[rank]], y[start:start + share[rank]]
        cb.expect_shares(share)
        opt.zero_grad(set_to_none=True)
        for xm, ym in zip(torch.split(x, split(len(y), k)), torch.split(y, split(len(y), k)), strict=True):
            loss = F.cross_entropy(model(xm), ym, reduction="sum") / len(y)
            (loss if scaler is None else scaler.scale(loss)).backward()
        if comm is not None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            comm.allreduce_sum_(grads)
            for g in grads:
                g /= world
        if scaler is not None:
            scaler.unscale_(opt)
        cb.step(share)
        record.append({"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                       "factors": {n: [m.clone() for m in b.factors()] for n, b in cb.blocks.items()}})
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return record


def reference(case: str) -> tuple[list[dict[str, Any]], dict[str, list[torch.Tensor]], torch.nn.Module]:
    """One rank, one batch of N a step, no accumulation."""
    build, data, options = CASES[case]
    base = build()
    model = copy.deepcopy(base)
    cb = KFACCallback(model, **OPTIONS, **options)
    return train(model, cb, data, 1), inverses(cb), base


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_give_one_batchs_factors_inverses_and_update(case: str, ranks: int) -> None:
    _, data, options = CASES[case]
    want, want_inverses, base = reference(case)
    models = [copy.deepcopy(base) for _ in range(ranks)]

    def rank_main(comm: ThreadComm | None) -> Any:
        model = models[0 if comm is None else comm.rank]
        cb = KFACCallback(model, comm=comm, accumulate_steps=K, **OPTIONS, **options)
        got = train(model, cb, data, K, comm)
        routes = {n: isinstance(b, LinearBlock) and b.batch_route_cheaper(N) for n, b in cb.blocks.items()}
        return got, inverses(cb), routes

    results = [rank_main(None)] if ranks == 1 else run_ranks(ranks, rank_main)
    worst, owned = 0.0, set()
    for got, got_inverses, routes in results:
        assert any(routes.values()) == (case != "direct")  # the cases take the routes they claim
        worst = max(worst, worst_difference(got, want))
        for name, mats in got_inverses.items():
            owned.add(name)
            for m_got, m_want in zip(mats, want_inverses[name], strict=True):
                worst = max(worst, relative(m_got, m_want))
    assert owned == set(want_inverses)
    print(f"{case}, {ranks} rank(s), {K} micro-batches: max relative difference {worst:.2e}")
    assert worst < TOLERANCE


def test_skip_weight_grad_leaves_every_micro_batchs_weight_gemm_to_the_step() -> None:
    """All K forward calls of fc1 skip the weight GEMM, so the batch route writes its gradient."""
    model = wide_net()
    cb = KFACCallback(model, accumulate_steps=K, skip_weight_grad=True, **OPTIONS)
    x, y = vector_data(160, 10)(0, N)
    for xm, ym in zip(torch.split(x, split(N, K)), torch.split(y, split(N, K)), strict=True):
        (F.cross_entropy(model(xm), ym, reduction="sum") / N).backward()
    assert len(cb.capture.skipped["fc1"]) == K and model.fc1.weight.grad is None
    cb.step()
    assert model.fc1.weight.grad is not None


def test_undeclared_micro_batches_do_not_give_one_batchs_factors() -> None:
    """Without accumulate_steps the callback takes each layer's last call only: the check above
    would catch a callback that forgot the other micro-batches."""
    _, data, _ = CASES["batch_route"]
    want, _, base = reference("batch_route")
    model = copy.deepcopy(base)
    got = train(model, KFACCallback(model, **OPTIONS), data, K)
    assert worst_difference(got, want) > 1e-3


def test_accumulate_steps_must_be_a_positive_integer() -> None:
    with pytest.raises(ValueError, match="accumulate_steps must be an integer >= 1, got 0"):
        KFACCallback(wide_net(), accumulate_steps=0)


def test_a_grad_scalers_scale_is_divided_out() -> None:
    """A loss scaled by 2^10 gives the unscaled run's factors and gradients (K-FAC sees unscale_d
    gradients and divides the scale out of the captured output gradients)."""
    _, data, _ = CASES["batch_route"]
    want, _, base = reference("batch_route")
    model = copy.deepcopy(base)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=10 ** 6)
    cb = KFACCallback(model, grad_scaler=scaler, **OPTIONS)
    assert worst_difference(train(model, cb, data, 1, scaler=scaler), want) < TOLERANCE


def fp32_steps(scaler: Any, lines: list[str], kfac_at_overflow: bool = True) -> KFACCallback:
    """4 float32 steps; step 1 has one input of 1e17: its scaled gradients overflow while its
    captures (and so its factors, ~1e32) stay finite. ``kfac_at_overflow=False``: no K-FAC step
    there at all (the reference)."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12, bias=False), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    cb = KFACCallback(model, grad_scaler=scaler, damping_act=0.01, damping_err=0.1, printer=lines.append)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(20, 16, generator=gen), torch.randint(0, 4, (20,), generator=gen)
        if step == 1:
            x[0, :] = 1e17
        opt.zero_grad(set_to_none=True)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        if step != 1 or kfac_at_overflow:
            cb.step()
        else:
            cb.capture.clear()
        scaler.step(opt)
        scaler.update()
    return cb


def test_a_step_the_scaler_skips_is_never_folded_into_the_factors() -> None:
    lines: list[str] = []

    def scaler() -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 80, growth_interval=10 ** 6)

    overflowed = fp32_steps(scaler(), lines)
    assert overflowed.skipped_steps == 1 and overflowed.steps == 3
    assert sum("the grad scaler skips this step" in line for line in lines) == 1
    reference_cb = fp32_steps(scaler(), [], kfac_at_overflow=False)
    for name, block in overflowed.blocks.items():
        for got, want in zip(block.factors(), reference_cb.blocks[name].factors(), strict=True):
            assert torch.equal(got, want), name
        assert float(block.factors()[0].abs().max()) < 1e6, name  # a folded 1e17 row gives ~1e32


def test_the_scaler_must_unscale_before_the_step() -> None:
    model = wide_net()
    scaler = torch.amp.GradScaler("cpu")
    cb = KFACCallback(model, grad_scaler=scaler, **OPTIONS)
    x, y = vector_data(160, 10)(0, 8)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(ValueError, match=r"call scaler.unscale_\(optimizer\) before the K-FAC step"):
        cb.step()


def test_layer_names_are_the_users_under_wrappers() -> None:
    """DataParallel (DDP's naming, without a process group) and torch.compile's wrapper: blocks,
    disable_layers and states use the names of the user's own model."""
    model = wide_net()
    cb = KFACCallback(torch.nn.DataParallel(model), disable_layers=["module.fc2"], **OPTIONS)
    assert list(cb.blocks) == ["fc1"] and cb.model is model
    x, y = vector_data(160, 10)(0, 8)
    F.cross_entropy(model(x), y).backward()
    cb.step()
    state = cb.state_dict()
    assert list(state["factors"]) == ["fc1"]
    prefixed = {**state, **{k: {f"module.{n}": v for n, v in state[k].items()} for k in ("factors", "updates", "inverses")}}
    again = KFACCallback(model, disable_layers=["fc2"], **OPTIONS)
    again.load_state_dict(prefixed)
    assert torch.equal(again.blocks["fc1"].A, cb.blocks["fc1"].A)
