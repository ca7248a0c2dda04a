"""The adaptive rules against dense float64 formulas (docs/algorithm.md §9): the curvature
products against JᵀHJ/N built from the full Jacobian; the update against the exact minimiser of
the dense quadratic model; the reduction ratio; the Levenberg-Marquardt transitions; the tied
factor damping; thread ranks against one rank; a checkpoint resumed mid-run."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from kfac_callback import KFACCallback
from kfac_callback.config import make_config
from kfac_callback.estimation.outputs import Bernoulli, Categorical
from kfac_callback.policy.adaptive import AdaptiveRules, curvature_gram, levenberg_marquardt, solve_coefficients
from models import Autoencoder
from tests.kfac_callback.test_uneven_shares import combine
from tests.support.threads import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64
RULES = {"adapt_learning_rate": True, "adapt_momentum": True, "adapt_damping": True,
         "damping_adaptation_interval": 1, "initial_damping": 0.5, "use_pi": True}


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(5, 4), act=nn.Tanh(), fc2=nn.Linear(4, 3))).to(D)


def cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3), bn=nn.BatchNorm2d(2), act=nn.ReLU(),
                                     flat=nn.Flatten(), fc=nn.Linear(2 * 4 * 4, 3))).to(D)


def autoencoder() -> nn.Module:
    torch.manual_seed(3)
    return Autoencoder((6, 5, 2, 5, 6)).to(D)


def data(name: str, n: int = 7) -> tuple[torch.Tensor, torch.Tensor, Categorical | Bernoulli]:
    gen = torch.Generator().manual_seed(5)
    if name == "cnn":
        return torch.randn(n, 1, 6, 6, generator=gen, dtype=D), torch.randint(0, 3, (n,), generator=gen), Categorical()
    if name == "autoencoder":
        x = torch.rand(n, 6, generator=gen, dtype=D)
        return x, x, Bernoulli()
    return torch.randn(n, 5, generator=gen, dtype=D), torch.randint(0, 3, (n,), generator=gen), Categorical()


MODELS = {"mlp": mlp, "cnn": cnn, "autoencoder": autoencoder}


def flat_params(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    return names, torch.cat([p.detach().flatten() for p in model.parameters()])


def unflatten(model: nn.Module, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n, p in model.named_parameters():
        out[n] = vector[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def dense_ggn(model: nn.Module, x: torch.Tensor, output: Categorical | Bernoulli) -> torch.Tensor:
    """C = (1/N) Jᵀ H J from the full Jacobian of every logit in every parameter, H per sample."""
    _, theta = flat_params(model)

    def logits(v: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {**unflatten(model, v), **dict(model.named_buffers())}, (x,))

    out = logits(theta).detach()
    jac = torch.autograd.functional.jacobian(lambda v: logits(v).flatten(), theta)  # [N·K, P]
    n, k = out.shape[0], out[0].numel()
    c = torch.zeros(theta.numel(), theta.numel(), dtype=D)
    for i in range(n):
        j = jac[i * k:(i + 1) * k]
        h = torch.stack([output.curvature(out[i:i + 1].flatten(1), e.unsqueeze(0))[0] for e in torch.eye(k, dtype=D)])
        c += j.T @ h @ j
    return c / n


def random_directions(model: nn.Module, count: int, seed: int = 9) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=gen, dtype=D) for n, p in model.named_parameters()} for _ in range(count)]


def as_vector(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in d.values()])


@pytest.mark.parametrize("name", list(MODELS))
def test_curvature_products_equal_the_dense_gauss_newton_matrix(name: str) -> None:
    model = MODELS[name]()
    x, _, output = data(name)
    dirs = random_directions(model, 2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    _, gram = curvature_gram(model, params, x, dirs, output, n_global=len(x))
    c = dense_ggn(model, x, output)
    v = torch.stack([as_vector(d) for d in dirs])
    expected = v @ c @ v.T
    assert torch.allclose(gram, expected, rtol=1e-10, atol=1e-12), (gram, expected)


def test_categorical_and_bernoulli_curvature_are_the_loss_hessians() -> None:
    gen = torch.Generator().manual_seed(0)
    z, v = torch.randn(1, 4, generator=gen, dtype=D), torch.randn(1, 4, generator=gen, dtype=D)
    for output, target in ((Categorical(), torch.tensor([2])), (Bernoulli(), torch.rand(1, 4, generator=gen, dtype=D))):
        def loss(t: torch.Tensor, output=output, target=target) -> torch.Tensor:
            return output.loss_sum(t.unsqueeze(0), target)

        hessian = torch.autograd.functional.hessian(loss, z[0])
        assert torch.allclose(output.curvature(z, v)[0], hessian @ v[0], atol=1e-12)


def test_coefficients_minimise_the_quadratic_model_over_the_plane() -> None:
    gen = torch.Generator().manual_seed(3)
    p = 6
    root = torch.randn(p, p, generator=gen, dtype=D)
    c = root @ root.T
    g, delta, prev = (torch.randn(p, generator=gen, dtype=D) for _ in range(3))
    lam, eta = 0.3, 0.01
    basis = torch.stack([delta, prev], 1)
    coef = solve_coefficients(basis.T @ c @ basis, basis.T @ basis, basis.T @ g, lam, eta, momentum=True)

    def model(ab: torch.Tensor) -> torch.Tensor:
        d = basis @ ab
        return 0.5 * d @ (c + (lam + eta) * torch.eye(p, dtype=D)) @ d + g @ d

    exact = torch.linalg.lstsq(basis.T @ (c + (lam + eta) * torch.eye(p, dtype=D)) @ basis, -basis.T @ g).solution
    assert torch.allclose(torch.tensor([coef.alpha, coef.mu], dtype=D), exact, rtol=1e-10)
    ab = torch.tensor([coef.alpha, coef.mu], dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(model(ab), ab)
    assert grad.abs().max() < 1e-10
    d = basis @ exact
    assert coef.model_change == pytest.approx(float(0.5 * d @ (c + eta * torch.eye(p, dtype=D)) @ d + g @ d), rel=1e-10)
    alone = solve_coefficients(basis.T @ c @ basis, basis.T @ basis, basis.T @ g, lam, eta, momentum=False)
    curvature = delta @ c @ delta + (lam + eta) * delta @ delta
    parallel = torch.stack([delta, -2 * delta], 1)  # δ₀ along Δ: the 2×2 is singular, α alone
    along = solve_coefficients(parallel.T @ c @ parallel, parallel.T @ parallel, parallel.T @ g, lam, eta, momentum=True)
    assert along.mu == 0 and along.alpha == pytest.approx(float(-(g @ delta) / curvature), rel=1e-12)
    assert alone.mu == 0 and alone.alpha == pytest.approx(float(-(g @ delta) / curvature), rel=1e-12)


def test_levenberg_marquardt_transitions() -> None:
    assert levenberg_marquardt(1.0, 0.9, 0.5, 1e-3, 10.0) == 0.5  # ρ > 3/4: trust the model more
    assert levenberg_marquardt(1.0, 0.1, 0.5, 1e-3, 10.0) == 2.0  # ρ < 1/4: less
    assert levenberg_marquardt(1.0, 0.5, 0.5, 1e-3, 10.0) == 1.0  # between: unchanged
    assert levenberg_marquardt(1.0, float("nan"), 0.5, 1e-3, 10.0) == 2.0  # no ratio: as a bad one
    assert levenberg_marquardt(8.0, -1.0, 0.5, 1e-3, 10.0) == 10.0  # clamped above
    assert levenberg_marquardt(1.5e-3, 1.0, 0.5, 1e-3, 10.0) == 1e-3  # and below


def plain_step(model: nn.Module, cb: KFACCallback, x: torch.Tensor, t: torch.Tensor, output, l2: float,
               lr: float = 0.5) -> dict[str, torch.Tensor]:
    """Forward, backward, K-FAC step (rules on); returns the plain gradient it saw."""
    model.zero_grad()
    loss = output.loss_sum(model(x), t) / len(x) + 0.5 * l2 * sum((p * p).sum() for p in model.parameters())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    cb.step(learning_rate=lr, batch=(x, t))
    return grads


@pytest.mark.parametrize("subsample", [0, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_update_minimises_the_dense_model_over_kfac_direction_and_previous_update(name: str, subsample: int) -> None:
    """Two steps: the second update δ = −lr·grad lies in span{Δ, δ₀} and the dense model's gradient
    there vanishes, Bᵀ((C + (λ+η)I)δ + ∇h) = 0; ρ is the dense ratio; λ moved by the rule. With
    adaptive_batch_size = 4 of 7, C and ρ are those of the first 4 samples (Δ, ∇h of all 7)."""
    model = MODELS[name]()
    x, t, output = data(name)
    l2, lr = 0.01, 0.5
    cb = KFACCallback(model, output=output, l2_reg=l2, printer=lambda s: None, adaptive_batch_size=subsample, **RULES)
    rows = subsample or len(x)  # the rows of the curvature and the ratio
    first = copy.deepcopy(model)
    plain_step(model, cb, x, t, output, l2, lr)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)
    prev = as_vector(cb.adaptive.previous)
    moved = as_vector({n: p.detach() for n, p in model.named_parameters()}) - as_vector(
        {n: p.detach() for n, p in first.named_parameters()})
    assert torch.allclose(moved, prev, rtol=1e-12, atol=1e-14)  # SGD applied exactly δ
    damping = cb.adaptive.damping
    twin = copy.deepcopy(model)
    # The same K-FAC without the rules, at the dampings the rules tie to λ: its update is Δ = −P.
    twin_cb = KFACCallback(twin, output=output, l2_reg=l2, printer=lambda s: None,
                           **{**RULES, "adapt_learning_rate": False, "adapt_momentum": False, "adapt_damping": False})
    twin_cb.load_state_dict({**cb.state_dict(), "dampings": list(cb.current_dampings())})
    grads = plain_step(model, cb, x, t, output, l2, lr)
    twin.zero_grad()
    (output.loss_sum(twin(x), t) / len(x) + 0.5 * l2 * sum((p * p).sum() for p in twin.parameters())).backward()
    twin_cb.step()
    kfac_dir = -as_vector({n: p.grad for n, p in twin.named_parameters()})
    delta = -lr * as_vector({n: p.grad for n, p in model.named_parameters()})
    g = as_vector(grads)
    a = dense_ggn(twin, x[:rows], output) + (damping + l2) * torch.eye(len(g), dtype=D)
    basis = torch.stack([kfac_dir, prev], 1)
    exact = torch.linalg.solve(basis.T @ a @ basis, -basis.T @ g)
    assert torch.allclose(delta, basis @ exact, rtol=1e-8, atol=1e-12)
    assert (basis.T @ (a @ delta + g)).abs().max() < 1e-8 * g.norm()
    # The reduction ratio of this step, densely: (h(θ+δ) − h(θ)) / (½δᵀ(C+ηI)δ + ∇hᵀδ).
    theta = as_vector({n: p.detach() for n, p in twin.named_parameters()})

    def h(v: torch.Tensor) -> float:
        out = torch.func.functional_call(twin, {**unflatten(twin, v), **{k: b.clone() for k, b in twin.named_buffers()}},
                                         (x[:rows],))
        return float(output.loss_sum(out, t[:rows]) / rows + 0.5 * l2 * (v * v).sum())

    c_l2 = dense_ggn(twin, x[:rows], output) + l2 * torch.eye(len(g), dtype=D)
    rho = (h(theta + delta) - h(theta)) / float(0.5 * delta @ c_l2 @ delta + g @ delta)
    assert cb.adaptive.rho == pytest.approx(rho, rel=1e-8)
    assert cb.adaptive.damping == levenberg_marquardt(damping, rho, 0.95, 1e-8, 1e8)  # ω = 0.95¹ (T = 1)


def test_factor_damping_is_tied_to_the_adaptive_damping() -> None:
    cb = KFACCallback(mlp(), l2_reg=0.04, printer=lambda s: None, **RULES)
    cb.adaptive.damping = 0.21
    d = cb.current_dampings()
    assert d.act == d.err == pytest.approx(0.5) and d.bn_act == pytest.approx(0.25)


def test_thread_ranks_choose_what_one_rank_chooses() -> None:
    """Four ranks with uneven shares of a batch of 10: the same weights, λ, α, μ as one rank."""
    x, t, output = data("autoencoder", 10)
    shares = [4, 3, 2, 1]
    start = autoencoder()  # built once: threads drawing from the global generator at once would differ

    def train(comm=None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        model = copy.deepcopy(start)
        world = 1 if comm is None else comm.world_size
        rank = 0 if comm is None else comm.rank
        cb = KFACCallback(model, comm=comm, output=output, l2_reg=0.01, printer=lambda s: None, **RULES)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        lo = sum(shares[:rank]) if world > 1 else 0
        hi = lo + (shares[rank] if world > 1 else len(x))
        for _ in range(4):
            opt.zero_grad()
            xs, ts = x[lo:hi], t[lo:hi]
            # Each rank's loss the mean over its own samples, combined with weights n_r/N (the trainer's way).
            loss = output.loss_sum(model(xs), ts) / len(xs) + 0.5 * 0.01 * sum((p * p).sum() for p in model.parameters())
            loss.backward()
            if comm is not None:
                combine(model, comm, shares)
            cb.step(shares if comm is not None else None, learning_rate=0.5, batch=(xs, ts))
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}, cb.adaptive.metrics()

    one = train()
    for weights, metrics in run_ranks(4, train):
        for n in one[0]:
            assert torch.allclose(weights[n], one[0][n], rtol=1e-10, atol=1e-12), n
        for k, v in one[1].items():
            assert metrics[k] == pytest.approx(v, rel=1e-9), k


def test_state_dict_resumes_the_rules_exactly() -> None:
    x, t, output = data("autoencoder")

    def run(steps: int, resume_at: int | None = None) -> dict[str, torch.Tensor]:
        model = autoencoder()
        cb = KFACCallback(model, output=output, l2_reg=0.01, printer=lambda s: None, **RULES)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for s in range(steps):
            if s == resume_at:
                state = copy.deepcopy(cb.state_dict())
                cb = KFACCallback(model, output=output, l2_reg=0.01, printer=lambda s: None, **RULES)
                cb.load_state_dict(state)
            plain_step(model, cb, x, t, output, 0.01)
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    straight, resumed = run(4), run(4, resume_at=2)
    for n in straight:
        assert torch.equal(straight[n], resumed[n]), n


def test_the_rules_refuse_what_they_cannot_serve() -> None:
    with pytest.raises(ValueError, match="adapt_learning_rate"):
        make_config(adapt_damping=True)
    with pytest.raises(ValueError, match="kl_clip"):
        make_config(adapt_learning_rate=True, kl_clip=0.01)
    with pytest.raises(ValueError, match="initial_damping"):
        make_config(adapt_learning_rate=True, initial_damping=1e-9, min_damping=1e-6)
    cb = KFACCallback(mlp(), printer=lambda s: None, adapt_learning_rate=True)
    with pytest.raises(ValueError, match="batch"):
        cb.step(learning_rate=0.1)
    with pytest.raises(ValueError, match="accumulate_steps"):
        cb.accumulate_steps = 2
    assert AdaptiveRules(make_config()).enabled is False


def test_the_setup_line_names_the_rules() -> None:
    line = KFACCallback(mlp(), printer=lambda s: None, **RULES).setup_lines()[0]
    assert " adaptive=lr+momentum+damping initial_damping=0.5 damping_range=1e-08..1e+08 damping_adaptation=1x0.95 " in line
    assert "adaptive" not in KFACCallback(mlp(), printer=lambda s: None).setup_lines()[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_calibration_scales_the_initial_damping_by_the_curvature_along_the_gradient(name: str) -> None:
    """calibrate_damping: λ₀ = initial_damping · gᵀCg / gᵀg with the dense C, before the first
    inverses (whose factor damping is √(λ₀ + η))."""
    model = MODELS[name]()
    x, t, output = data(name)
    l2 = 0.01
    cb = KFACCallback(model, output=output, l2_reg=l2, printer=lambda s: None, calibrate_damping=True,
                      **{**RULES, "initial_damping": 0.1, "damping_adaptation_interval": 5})
    twin = copy.deepcopy(model)
    seen = []
    original = cb.current_dampings
    cb.current_dampings = lambda: seen.append(cb.adaptive.damping) or original()
    grads = plain_step(model, cb, x, t, output, l2)
    g = as_vector(grads)
    expected = 0.1 * float(g @ dense_ggn(twin, x, output) @ g / (g @ g))
    assert seen[0] == pytest.approx(expected, rel=1e-10) and cb.adaptive.calibrated
    state = cb.state_dict()["adaptive"]
    assert state["calibrated"] and state["damping"] == pytest.approx(expected, rel=1e-10)  # no LM step yet (T = 5)
