"""kfac.fisher=mc: G from labels sampled from the model's predictions, against dense float64
formulas; its average against the exact Fisher; R ranks against one; a resumed run draws the
same labels (docs/algorithm.md §3, "Fisher")."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_callback import KFACCallback
from kfac_callback.estimation.outputs import Categorical
from tests.kfac_callback.test_uneven_shares import combine, relative, vector_data
from tests.support.threads import ThreadComm, run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: several threads only thrash

D = torch.float64
OPTIONS = {"damping_act": 0.01, "damping_err": 0.1, "kronecker_decay": 0.7, "printer": lambda s: None}


def net() -> nn.Module:
    """fc1 through the batch at N = 60 (cheaper below N = 126), fc2 with a bias the direct way."""
    torch.manual_seed(4)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(160, 240, bias=False), act=nn.Tanh(),
                                     fc2=nn.Linear(240, 6))).to(D)


def mc_step(model: nn.Module, cb: KFACCallback, x: torch.Tensor, y: torch.Tensor,
            shares: list[int] | None = None, comm: ThreadComm | None = None) -> None:
    """One step as a plain loop runs it with fisher=mc: forward, sample_fisher, backward, step."""
    if shares is not None:
        cb.expect_shares(shares)
    logits = model(x)
    cb.sample_fisher(logits)
    (F.cross_entropy(logits, y) if len(y) else logits.sum() * 0).backward()
    if shares is not None:
        combine(model, comm, shares)
    cb.step(shares)


def test_mc_factors_equal_the_dense_formula_of_the_sampled_labels() -> None:
    """G = N Σ e eᵀ with e from the loss of the labels the seed draws; A as empirical; the
    preconditioned gradient G_d⁻¹ ∇ A_d⁻¹ of the TRUE labels' ∇ (fc1 through the batch)."""
    n = 60
    x, y = vector_data(160, 6)(0, n)
    model = net()
    twin = copy.deepcopy(model)
    cb = KFACCallback(model, fisher="mc", seed=7, **OPTIONS)
    ref = KFACCallback(twin, **OPTIONS)
    outs: dict[str, torch.Tensor] = {}
    for name in ("fc1", "fc2"):
        getattr(twin, name).register_forward_hook(lambda m, args, out, name=name: outs.__setitem__(name, (args[0], out)))
    logits = model(x)
    cb.sample_fisher(logits)
    F.cross_entropy(logits, y).backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    cb.step()

    twin_logits = twin(x)
    labels = Categorical().sample(twin_logits, 7, 0, 0, n)
    assert not torch.equal(labels, y)
    e = torch.autograd.grad(F.cross_entropy(twin_logits, labels), [outs["fc1"][1], outs["fc2"][1]], retain_graph=True)
    F.cross_entropy(twin_logits, y).backward()
    assert all(torch.equal(plain[k], p.grad) for k, p in twin.named_parameters())  # .grad untouched by sampling
    p = torch.softmax(twin_logits.detach(), 1)
    assert relative(e[1], (p - F.one_hot(labels, 6)) / n) < 1e-12  # the last layer's e, by hand
    ones = torch.ones(n, 1, dtype=D)
    a1, a2 = outs["fc1"][0].detach(), torch.cat([outs["fc2"][0].detach(), ones], 1)
    want = {"fc1": [a1.mT @ a1 / n, n * e[0].mT @ e[0]], "fc2": [a2.mT @ a2 / n, n * e[1].mT @ e[1]]}
    worst = max(relative(got, w) for name, mats in want.items()
                for got, w in zip(cb.blocks[name].factors(), mats, strict=True))
    ref.step()  # empirical: the same A, another G
    assert relative(ref.blocks["fc2"].A, cb.blocks["fc2"].A) < 1e-14
    assert relative(ref.blocks["fc2"].G, cb.blocks["fc2"].G) > 0.05
    for name, grad in (("fc1", plain["fc1.weight"]), ("fc2", torch.cat([plain["fc2.weight"],
                                                                         plain["fc2.bias"][:, None]], 1))):
        a_f, g_f = want[name]
        precond = torch.linalg.solve(g_f + 0.1 * torch.eye(len(g_f), dtype=D), grad) \
            @ torch.linalg.inv(a_f + 0.01 * torch.eye(len(a_f), dtype=D))
        layer = getattr(model, name)
        got = layer.weight.grad if layer.bias is None else torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        worst = max(worst, relative(got, precond))
    print(f"mc factors and preconditioned gradients vs dense formulas: max relative difference {worst:.2e}")
    assert worst < 1e-10


def test_mc_g_of_the_last_layer_averages_to_the_exact_fisher() -> None:
    """E[G] = (1/N) Σ_i (diag(p_i) − p_i p_iᵀ) for the last layer; the mean of 400 draws is
    within 2% (relative Frobenius norm; measured 0.8%, the empirical G 36% off)."""
    n, draws = 60, 400
    x, y = vector_data(20, 6)(1, n)
    torch.manual_seed(5)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(20, 12), act=nn.Tanh(), fc2=nn.Linear(12, 6))).to(D)
    cb = KFACCallback(model, fisher="mc", kronecker_decay=0.0, compute_interval_steps=10**6, printer=lambda s: None)
    total = torch.zeros(6, 6, dtype=D)
    for seed in range(draws):
        cb.seed = seed  # the step counter advances too: another generator every draw
        mc_step(model, cb, x, y)
        total += cb.blocks["fc2"].G
        model.zero_grad(set_to_none=True)
    p = torch.softmax(model(x).detach(), 1)
    exact = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    error = relative(total / draws, exact)
    empirical = KFACCallback(copy.deepcopy(model), printer=lambda s: None)
    F.cross_entropy(empirical.model(x), y).backward()
    empirical.step()
    print(f"mean of {draws} mc G vs exact Fisher: relative error {error:.4f}; "
          f"empirical G vs exact: {relative(empirical.blocks['fc2'].G, exact):.3f}")
    assert error < 0.02  # measured 0.0081 (seeded: the same every run)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("shares", [[20, 20, 20], [35, 20, 5], [40, 20, 0]])
def test_mc_on_three_ranks_equals_one_rank(shares: list[int], skip: bool) -> None:
    """Ranks (with skip_weight_grad, whose fc1 backward is WithoutWeightGrad) against 1 rank without."""
    n, steps = 60, 3
    base = net()
    models = [copy.deepcopy(base) for _ in range(4)]
    options = {**OPTIONS, "fisher": "mc", "inverse_strategy": "balanced"}

    def run(model: nn.Module, cb: KFACCallback, rank: int = 0, comm: ThreadComm | None = None) -> list[Any]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        record = []
        for step in range(steps):
            x, y = vector_data(160, 6)(step, n)
            if comm is not None:
                part = slice(sum(shares[:rank]), sum(shares[:rank + 1]))
                x, y = x[part], y[part]
            opt.zero_grad(set_to_none=True)
            mc_step(model, cb, x, y, shares if comm is not None else None, comm)
            record.append([p.grad.clone() for p in model.parameters()]
                          + [m.clone() for b in cb.blocks.values() for m in b.factors()])
            opt.step()
        return record

    want = run(models[3], KFACCallback(models[3], seed=5, **options))

    def rank_main(comm: ThreadComm) -> Any:
        cb = KFACCallback(models[comm.rank], comm=comm, seed=5, skip_weight_grad=skip, **options)
        return run(models[comm.rank], cb, comm.rank, comm)

    worst = max(relative(g, w) for got in run_ranks(3, rank_main)
                for step_got, step_want in zip(got, want, strict=True)
                for g, w in zip(step_got, step_want, strict=True))
    print(f"mc {shares} skip_weight_grad={skip}: max relative difference 3 ranks vs 1 {worst:.2e}")
    assert worst < 1e-9


def test_a_resumed_run_draws_the_same_labels() -> None:
    """The step counter is in the state: steps 0-2 in one go equal 0-1, save, load, 2."""
    n = 60
    base = net()
    models = [copy.deepcopy(base) for _ in range(2)]
    cbs = [KFACCallback(m, fisher="mc", seed=3, **OPTIONS) for m in models]
    for step in range(2):
        for model, cb in zip(models, cbs, strict=True):
            mc_step(model, cb, *vector_data(160, 6)(step, n))
            model.zero_grad(set_to_none=True)
    resumed = copy.deepcopy(models[1])
    cb = KFACCallback(resumed, fisher="mc", seed=3, **OPTIONS)
    cb.load_state_dict(cbs[1].state_dict())
    x, y = vector_data(160, 6)(2, n)
    mc_step(models[0], cbs[0], x, y)
    mc_step(resumed, cb, x, y)
    assert all(torch.equal(p, q) for p, q in zip(cbs[0].blocks["fc2"].factors(), cb.blocks["fc2"].factors(),
                                                 strict=True))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(models[0].parameters(), resumed.parameters(), strict=True))


def test_mc_without_sampling_and_with_accumulation_is_refused() -> None:
    with pytest.raises(ValueError, match=r"kfac.fisher=mc does not support trainer.accumulate_steps=2"):
        KFACCallback(net(), fisher="mc", accumulate_steps=2)
    model = net()
    cb = KFACCallback(model, fisher="mc", printer=lambda s: None)
    x, y = vector_data(160, 6)(0, 60)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"call sample_fisher\(logits\) after the forward pass"):
        cb.step()


def test_empirical_ignores_sample_fisher() -> None:
    """The default: sample_fisher is a no-op and the numbers are those of a loop without it."""
    base = net()
    runs = []
    for sample in (False, True):
        model = copy.deepcopy(base)
        cb = KFACCallback(model, **OPTIONS)
        x, y = vector_data(160, 6)(0, 60)
        logits = model(x)
        if sample:
            cb.sample_fisher(logits)
        F.cross_entropy(logits, y).backward()
        cb.step()
        runs.append([p.grad for p in model.parameters()] + [m for b in cb.blocks.values() for m in b.factors()])
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


def test_our_trainer_samples_the_fisher_and_passes_its_learning_rate() -> None:
    """trainer.logits reaches sample_fisher at on_forward_prop_end (else step() would refuse),
    the trainer's seed seeds the labels, and kl_clip gets the optimizer's learning rate."""
    from tests.support.trainers import make_trainer

    factors = {}
    for fisher in ("empirical", "mc"):
        trainer = make_trainer(optimizer="sgd")
        cb = KFACCallback(trainer.model, fisher=fisher, kl_clip=1e-6, factor_batch_size=6, printer=lambda s: None)
        trainer.callbacks = [cb]
        cb.on_setup_end(trainer)  # as the trainer calls it when given the callback at construction
        trainer.fit()
        assert cb.steps == 2 and cb.seed == trainer.seed
        assert 0 < cb.metrics()["kfac_kl_nu"] < 1
        factors[fisher] = cb.blocks["ip3"].G
    assert relative(factors["mc"], factors["empirical"]) > 0.01
