"""K-FAC's adaptive rules: learning rate and momentum from the quadratic model, and
Levenberg-Marquardt damping from the reduction ratio (docs/algorithm.md §9).

Each step K-FAC proposes the direction Δ = −P (the preconditioned gradient; the plain gradient
where no block covers a parameter). With the previous update δ₀ the update is δ = αΔ + μδ₀,
(α, μ) minimising the local quadratic model of the objective h over that plane,

    M(δ) = ½ δᵀ (C + (λ + η) I) δ + ∇hᵀ δ,

C the exact curvature (the Fisher / generalised Gauss-Newton matrix of the mini-batch), λ the
damping and η the L2 coefficient of the objective. In the plane that is a 2×2 solve, whose
entries need Cδ products only as quadratic forms: (J d_a)ᵀ H (J d_b) / N summed over samples,
J d a forward-mode product through the network and H the loss's curvature in the logits
(``estimation/outputs.py``). Every T steps the damping follows the reduction ratio
ρ = (h(θ+δ) − h(θ)) / (M̂(δ) − M̂(0)), M̂ the model without λ: λ ← ω·λ when ρ > 3/4, λ ← λ/ω
when ρ < 1/4 (or ρ not finite), ω = decay^T, within [λ_min, λ_max]; the factors' damping is
tied to it, √(λ + η).

The pieces here are pure functions of tensors; ``AdaptiveRules`` holds the state (λ, δ₀, the
last α, μ, ρ) and runs them inside ``KFACCallback.step``. Every reduction is a sum over ranks of
each rank's share, so every rank computes the same (α, μ) and λ.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from kfac_callback.base import Communicator
from kfac_callback.estimation.outputs import Bernoulli, Categorical
from kfac_callback.estimation.subsample import factor_batch

Directions = Sequence[Mapping[str, torch.Tensor]]

# Forward-mode AD keeps its dual level in process-wide state: products from several threads
# (ranks as threads, in tests) take turns.
_FORWARD_AD = threading.Lock()


def _call(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """The model at ``params``; its buffers are copies (BatchNorm's running statistics stay)."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return functional_call(model, {**params, **buffers}, (inputs,))


def curvature_gram(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                   directions: Directions, output: Categorical | Bernoulli,
                   n_global: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at ``params`` and the matrix of this rank's ``(J d_a)ᵀ H (J d_b) / N``.

    Summed over ranks it is ``d_aᵀ C d_b``, C = (1/N) Σ_i J_iᵀ H_i J_i the mini-batch's
    generalised Gauss-Newton matrix (the Fisher, for these losses). The forward-mode products
    of all directions run in one vmapped pass where the model allows it (BatchNorm's in-place
    running statistics do not), else one pass each; the sums in float64.
    """
    names = list(params)
    primals = tuple(params[n] for n in names)

    def f(*values: torch.Tensor) -> torch.Tensor:
        return _call(model, dict(zip(names, values, strict=True)), inputs)

    tangents = [tuple(d[n].to(params[n].dtype) for n in names) for d in directions]
    # Fused attention kernels have no forward-mode derivative; the math kernel is composite.
    with _FORWARD_AD, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        logits, products = None, None
        if len(tangents) > 1 and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            stacked = tuple(torch.stack(ts) for ts in zip(*tangents, strict=True))
            logits, jd = vmap(lambda *t: jvp(f, primals, t), out_dims=(None, 0))(*stacked)
            products = [p.flatten(1).double() for p in jd]
        else:
            products = []
            for t in tangents:
                logits, jd = jvp(f, primals, t)
                products.append(jd.flatten(1).double())
    k = len(products)
    gram = torch.zeros(k, k, dtype=torch.float64)
    flat = logits.detach().flatten(1).double()
    for a in range(k):
        h = output.curvature(flat, products[a])
        for b in range(a, k):
            gram[a, b] = gram[b, a] = (h * products[b]).sum().cpu() / n_global
    return logits.detach(), gram


def dots(xs: Directions, ys: Directions) -> torch.Tensor:
    """The matrix of inner products ⟨x_a, y_b⟩ over every parameter, in float64."""
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    for n in xs[0]:
        a = torch.stack([x[n].flatten() for x in xs]).double()
        b = a if ys is xs else torch.stack([y[n].flatten() for y in ys]).double()
        out += (a @ b.T).cpu()
    return out


@dataclass(frozen=True)
class Coefficients:
    """The update's coefficients and what the quadratic model predicts for it."""

    alpha: float
    mu: float
    model_change: float  # M̂(δ) − M̂(0), the undamped model (damping's reduction ratio)


def solve_coefficients(curvature: torch.Tensor, gram: torch.Tensor, grad_dots: torch.Tensor,
                       damping: float, l2: float, momentum: bool) -> Coefficients:
    """(α, μ) minimising M over δ = αΔ + μδ₀; only α (μ = 0) without ``momentum`` or a δ₀.

    Args:
        curvature: [[ΔᵀCΔ, ΔᵀCδ₀], [δ₀ᵀCΔ, δ₀ᵀCδ₀]] (1×1 without δ₀).
        gram: the same with the identity in place of C.
        grad_dots: [∇hᵀΔ, ∇hᵀδ₀].
        damping: λ. l2: η.
        momentum: also choose μ.
    """
    k = 2 if momentum and curvature.shape[0] == 2 and gram[1, 1] > 0 else 1
    a = curvature + (damping + l2) * gram
    coef = torch.zeros(2, dtype=torch.float64)
    if k == 2 and torch.linalg.det(a[:2, :2]) > 1e-12 * a[0, 0] * a[1, 1]:
        coef = -torch.linalg.solve(a[:2, :2], grad_dots[:2])
    else:  # no momentum, or δ₀ along Δ: α alone
        k = 1
        if a[0, 0] > 0:
            coef[0] = -grad_dots[0] / a[0, 0]
    c, b = coef[:k], grad_dots[:k]
    change = 0.5 * c @ (curvature + l2 * gram)[:k, :k] @ c + c @ b
    alpha, mu = float(coef[0]), float(coef[1])
    if not (math.isfinite(alpha) and math.isfinite(mu)):
        return Coefficients(0.0, 0.0, 0.0)
    return Coefficients(alpha, mu, float(change))


def levenberg_marquardt(damping: float, rho: float, decay: float, low: float, high: float) -> float:
    """λ after a reduction ratio ρ: ×ω when ρ > 3/4 (the model is trusted), ÷ω when ρ < 1/4
    (or not finite), unchanged between; clamped to [low, high]."""
    if not math.isfinite(rho) or rho < 0.25:
        damping = damping / decay
    elif rho > 0.75:
        damping = damping * decay
    return min(max(damping, low), high)


def loss_share(logits: torch.Tensor, targets: torch.Tensor, output: Categorical | Bernoulli, n_global: int) -> float:
    """This rank's share of the global batch's mean loss (no L2 term), in float64."""
    return float(output.loss_sum(logits.double(), targets).cpu()) / n_global


def batch_loss(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: torch.Tensor,
               targets: torch.Tensor, output: Categorical | Bernoulli, n_global: int) -> float:
    """``loss_share`` of the model at ``params`` (0 for a rank without samples)."""
    if not len(inputs):
        return 0.0
    with torch.no_grad():
        return loss_share(_call(model, params, inputs), targets, output, n_global)


class AdaptiveRules:
    """The state and steps of the adaptive rules (configured by ``KFACConfig``'s ``adapt_*``).

    Args:
        config: the callback's ``KFACConfig``.
        l2: η, the objective's L2 coefficient (its curvature is ηI).
    """

    def __init__(self, config: Any, l2: float = 0.0) -> None:
        self.config = config
        self.l2 = float(l2)
        self.damping = float(config.initial_damping)  # λ
        self.previous: dict[str, torch.Tensor] | None = None  # δ₀
        self.alpha = self.mu = self.rho = float("nan")
        self.calibrated = not config.calibrate_damping  # λ₀ set from the first step's curvature

    def subsample(self, batch: tuple[Any, Any], comm: Communicator, n_global: int,
                  shares: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's rows of the model's subsample (``adaptive_batch_size``) and its global size."""
        inputs, targets = batch
        m, keep = factor_batch(self.config.adaptive_batch_size, len(inputs), comm.world_size, comm.rank, shares)
        return (inputs, targets, n_global) if m is None else (inputs[:keep], targets[:keep], m)

    def calibrate(self, model: nn.Module, plain: Mapping[str, torch.Tensor], batch: tuple[Any, Any],
                  output: Categorical | Bernoulli, comm: Communicator, n_global: int,
                  shares: Sequence[int] | None = None) -> None:
        """λ₀ = initial_damping · ∇hᵀC∇h / ∇hᵀ∇h: the curvature along the first gradient sets the
        damping's scale (a loss summed over 784 pixels has ~500× the curvature of a mean
        cross-entropy); one forward-mode pass, once, before the first inverses."""
        named = {n: p.detach() for n, p in model.named_parameters() if n in plain}
        inputs, _, n_global = self.subsample(batch, comm, n_global, shares)
        along = torch.zeros(1, dtype=torch.float64)
        if len(inputs):
            along[0] = curvature_gram(model, named, inputs, [plain], output, n_global)[1][0, 0]
        comm.allreduce_sum_([along])
        norm = float(dots([plain], [plain])[0, 0])
        scale = float(along[0]) / norm if norm > 0 and math.isfinite(float(along[0])) else 1.0
        c = self.config
        self.damping = min(max(c.initial_damping * scale, c.min_damping), c.max_damping)
        self.calibrated = True

    @property
    def enabled(self) -> bool:
        """Whether K-FAC chooses the update's size (the learning rate) itself."""
        return bool(self.config.adapt_learning_rate)

    def factor_damping(self) -> float:
        """The Kronecker factors' damping tied to λ: √(λ + η)."""
        return math.sqrt(self.damping + self.l2)

    def update(self, model: nn.Module, plain: Mapping[str, torch.Tensor], step: int, batch: tuple[Any, Any],
               output: Categorical | Bernoulli, comm: Communicator, n_global: int,
               learning_rate: float, shares: Sequence[int] | None = None) -> None:
        """Replaces every ``.grad`` (the preconditioned one, or the plain one where no block
        preconditions) by −δ/lr, δ = αΔ + μδ₀: the base optimizer (plain SGD at rate lr) then
        moves the weights by exactly δ.

        Args:
            plain: the rank-combined plain gradient ∇h (with the L2 term) by parameter name.
            step: s, the K-FAC step (the damping adapts when s + 1 is a multiple of T).
            batch: this rank's (inputs, targets) of the step.
            n_global: N, the step's global batch.
            learning_rate: the base optimizer's rate lr.
            shares: the step's per-rank sample counts (None: equal); with ``adaptive_batch_size``
                each rank's first m_r samples, split as ``factor_batch_size`` splits its M.
        """
        c = self.config
        named = {n: p for n, p in model.named_parameters() if n in plain}
        params = {n: p.detach() for n, p in named.items()}
        direction = {n: -(p.grad if p.grad is not None else plain[n]).detach() for n, p in named.items()}
        dirs = [direction] if self.previous is None else [direction, self.previous]
        # The model's curvature and ρ from a subsample of M samples (adaptive_batch_size).
        inputs, targets, n_global = self.subsample(batch, comm, n_global, shares)
        if len(inputs):
            logits, curvature = curvature_gram(model, params, inputs, dirs, output, n_global)
            before = loss_share(logits, targets, output, n_global)
        else:  # a rank without samples adds zeros to every sum
            curvature, before = torch.zeros(len(dirs), len(dirs), dtype=torch.float64), 0.0
        interval = c.damping_adaptation_interval
        adapt = c.adapt_damping and (step + 1) % interval == 0
        totals = torch.cat([curvature.flatten(), torch.tensor([before], dtype=torch.float64)])
        comm.allreduce_sum_([totals])
        curvature = totals[:-1].reshape(len(dirs), len(dirs))
        grad_dots = dots([plain], dirs)[0]
        coef = solve_coefficients(curvature, dots(dirs, dirs), grad_dots, self.damping, self.l2,
                                  c.adapt_momentum)
        delta = {n: coef.alpha * direction[n] + (coef.mu * self.previous[n] if self.previous and coef.mu else 0)
                 for n in named}
        self.alpha, self.mu = coef.alpha, coef.mu
        if adapt:
            moved = {n: params[n] + delta[n].to(params[n].dtype) for n in named}
            after = torch.tensor([batch_loss(model, moved, inputs, targets, output, n_global)], dtype=torch.float64)
            comm.allreduce_sum_([after])
            l2_change = 0.5 * self.l2 * float(sum(((moved[n].double() ** 2).sum() - (params[n].double() ** 2).sum())
                                                 for n in named))
            change = float(after[0]) - float(totals[-1]) + l2_change
            self.rho = change / coef.model_change if coef.model_change < 0 else float("nan")
            self.damping = levenberg_marquardt(self.damping, self.rho, c.damping_adaptation_decay ** interval,
                                               c.min_damping, c.max_damping)
        for n, p in named.items():
            p.grad = (-delta[n] / learning_rate).to(p.dtype)
        self.previous = {n: d.detach().clone() for n, d in delta.items()}

    def metrics(self) -> dict[str, float]:
        """λ and the last step's α, μ, ρ, for the per-epoch record."""
        return {"kfac_lm_damping": self.damping, "kfac_alpha": self.alpha, "kfac_mu": self.mu, "kfac_rho": self.rho}

    def state_dict(self) -> dict[str, Any]:
        """λ, δ₀ and the last coefficients."""
        return {"damping": self.damping, "alpha": self.alpha, "mu": self.mu, "rho": self.rho,
                "calibrated": self.calibrated,
                "previous": None if self.previous is None else {n: t.clone() for n, t in self.previous.items()}}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restores ``state_dict()``; ``None`` (a checkpoint from before the rules) starts afresh."""
        if state is None:
            return
        self.damping = float(state["damping"])
        self.alpha, self.mu, self.rho = (float(state[k]) for k in ("alpha", "mu", "rho"))
        self.calibrated = bool(state.get("calibrated", True))
        previous = state.get("previous")
        self.previous = None if previous is None else {n: t.clone() for n, t in previous.items()}
