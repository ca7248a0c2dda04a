"""kfac.kl_clip: ν = min(1, sqrt(c / |lr² Σ ⟨P, ∇⟩|)) and the clipped gradients against a dense
computation; off (or ν = 1) is bit for bit the unclipped step; skip_weight_grad and several ranks
give the same ν (docs/algorithm.md §5, "KL-clipping")."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kfac_callback import KFACCallback
from tests.kfac_callback.test_uneven_shares import combine, conv_net, image_data, relative, vector_data, wide_net
from tests.support.threads import ThreadComm, run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: several threads only thrash

OPTIONS = {"damping_act": 0.01, "damping_err": 0.1, "printer": lambda s: None}
LR = 0.1
CASES = {"direct": (conv_net, image_data), "batch_route": (wide_net, vector_data(160, 10))}


def one_step(build: Any, data: Any, n: int, **options: Any) -> tuple[KFACCallback, dict[str, torch.Tensor],
                                                                   dict[str, torch.Tensor]]:
    """One step on a fresh model: the callback, the plain gradients, the gradients after step()."""
    model = build()
    cb = KFACCallback(model, **OPTIONS, **options)
    x, y = data(0, n)
    F.cross_entropy(model(x), y).backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    cb.step(learning_rate=LR if options.get("kl_clip") else None)
    return cb, plain, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_nu_and_the_clipped_gradients_equal_the_dense_computation(case: str) -> None:
    build, data = CASES[case]
    _, plain, precond = one_step(build, data, 100)
    names = list(plain)
    vg = LR * LR * sum(float((precond[k] * plain[k]).sum()) for k in names)
    clip = abs(vg) / 4  # ν = 1/2
    nu = min(1.0, (clip / abs(vg)) ** 0.5)
    cb, _, clipped = one_step(build, data, 100, kl_clip=clip)
    assert cb.metrics()["kfac_kl_nu"] == cb.kl_nu
    worst = max(relative(clipped[k], nu * precond[k]) for k in names)
    print(f"{case}: nu {cb.kl_nu:.15f} (dense {nu:.15f}), clipped gradients max relative difference {worst:.2e}")
    assert cb.kl_nu == pytest.approx(nu, rel=1e-12)
    assert worst < 1e-12


@pytest.mark.parametrize("case", list(CASES))
def test_off_or_nu_one_is_the_unclipped_step_bit_for_bit(case: str) -> None:
    build, data = CASES[case]
    _, _, want = one_step(build, data, 100)
    for clip in (0.0, 1e30):
        cb, _, got = one_step(build, data, 100, kl_clip=clip)
        assert all(torch.equal(got[k], g) for k, g in want.items())
        assert ("kfac_kl_nu" in cb.metrics()) == (clip > 0)
    assert cb.kl_nu == 1.0


def test_skip_weight_grad_gives_the_same_nu() -> None:
    """fc1 without a plain gradient: ⟨P, gᵀa⟩ from the batch rows, the same ν as the gradient's."""
    build, data = CASES["batch_route"]
    _, plain, precond = one_step(build, data, 100)
    clip = LR * LR * abs(sum(float((precond[k] * plain[k]).sum()) for k in plain)) / 9
    with_grad, _, a = one_step(build, data, 100, kl_clip=clip)
    without, _, b = one_step(build, data, 100, kl_clip=clip, skip_weight_grad=True)
    print(f"nu {with_grad.kl_nu:.15f} with the gradient, {without.kl_nu:.15f} from the rows")
    assert with_grad.kl_nu == pytest.approx(1 / 3, rel=1e-12)
    assert without.kl_nu == pytest.approx(with_grad.kl_nu, rel=1e-12)
    assert max(relative(b[k], a[k]) for k in a) < 1e-12


@pytest.mark.parametrize("skip", [False, True])
def test_ranks_get_one_ranks_nu(skip: bool) -> None:
    """3 thread ranks (uneven shares, the owners' broadcast) against 1 rank: the same ν everywhere."""
    build, data = CASES["batch_route"]
    shares = [50, 30, 20]
    _, plain, precond = one_step(build, data, 100)
    clip = LR * LR * abs(sum(float((precond[k] * plain[k]).sum()) for k in plain)) / 4
    want, _, want_grads = one_step(build, data, 100, kl_clip=clip)
    base = build()
    models = [copy.deepcopy(base) for _ in range(3)]

    def rank_main(comm: ThreadComm) -> Any:
        model = models[comm.rank]
        cb = KFACCallback(model, comm=comm, kl_clip=clip, skip_weight_grad=skip, inverse_strategy="balanced",
                          **OPTIONS)
        x, y = data(0, 100)
        part = slice(sum(shares[:comm.rank]), sum(shares[:comm.rank + 1]))
        cb.expect_shares(shares)
        F.cross_entropy(model(x[part]), y[part]).backward()
        combine(model, comm, shares)
        cb.step(shares, learning_rate=LR)
        return cb.kl_nu, {k: p.grad.clone() for k, p in model.named_parameters()}

    results = run_ranks(3, rank_main)
    assert len({nu for nu, _ in results}) == 1  # bit for bit the same ν on every rank
    worst = max(relative(grads[k], g) for _, grads in results for k, g in want_grads.items())
    print(f"3 ranks skip_weight_grad={skip}: nu {results[0][0]:.15f}, 1 rank {want.kl_nu:.15f}; "
          f"gradients max relative difference {worst:.2e}")
    assert results[0][0] == pytest.approx(want.kl_nu, rel=1e-12)
    assert worst < 1e-9


def test_kl_clip_needs_the_learning_rate() -> None:
    model = wide_net()
    cb = KFACCallback(model, kl_clip=0.001, printer=lambda s: None)
    x, y = vector_data(160, 10)(0, 10)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="kl_clip > 0 needs the base optimizer's learning rate"):
        cb.step()
