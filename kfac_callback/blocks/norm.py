"""Affine normalisation layers: one factor over ``[γ; β]`` (docs/algorithm.md §3).

BatchNorm, LayerNorm and GroupNorm differ only in the statistics that normalise the input
(x̂); their scale and shift act element-wise on x̂ along a parameter axis, so one sample's
gradient is ``u = [Σ_s e·x̂ ; Σ_s e]`` summed over the positions s that share a parameter, and
the factor is the exact per-sample Fisher block ``F = N Σ u uᵀ`` over every affine parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kfac_callback.blocks.base import Block, Dampings
from kfac_callback.blocks.linalg import damped_inverse


class NormBlock(Block):
    """An affine normalisation layer: one P×P factor ``F`` over its parameters (γ first, then β).

    Subclasses say how the layer normalises (``normalised``). The factor uses the NORMALISED
    input x̂ (the statistics of a training-mode forward), not the raw input that LBANN's
    callback used for BatchNorm. γ takes the ``bn_act`` damping, β the ``bn_err`` damping.

    Attributes:
        F: Running average of the factor.
        F_inv: Inverse of the damped factor, or ``None``.
    """

    factor_names = ("F",)

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        self.F: torch.Tensor | None = None
        self.F_inv: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.parameters()[0].dtype == torch.float64 else torch.float32

    def features(self) -> int:
        """How many elements γ (and β) has."""
        return self.parameters()[0].numel()

    def factor_dims(self) -> list[int]:
        return [sum(p.numel() for p in self.parameters())]

    def normalised(self, a: torch.Tensor) -> torch.Tensor:
        """x̂ of a training-mode forward, shaped (n, features, positions)."""
        raise NotImplementedError

    def by_feature(self, g: torch.Tensor) -> torch.Tensor:
        """The output gradient laid out as ``normalised`` lays out x̂."""
        return g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:]))

    def gram_terms(self, a: torch.Tensor, g: torch.Tensor, n_global: int,
                   n_local: int | None = None, keep: int | None = None) -> list[tuple[torch.Tensor, float]]:
        # x̂ under each micro-batch's own statistics, as its forward normalised it: a subsample
        # (keep) takes its rows of x̂, normalised over the whole micro-batch (docs/algorithm.md §3).
        n = a.shape[0] if n_local is None else n_local
        xhat = self.normalised(a.to(self.dtype))
        gr = self.by_feature(g.to(self.dtype))
        if keep is not None:
            xhat, gr = xhat[:keep], gr[:keep]
        parts = [(gr * xhat).sum(dim=2)] if self.module.weight is not None else []
        if getattr(self.module, "bias", None) is not None:
            parts.append(gr.sum(dim=2))
        # N Σ u uᵀ with u built from e = grad_output·n/N.
        return [(torch.cat(parts, dim=1), n * n / n_global)]

    def _invert(self, damping: Dampings, use_pi: bool, use_eigen: bool, dtype: torch.dtype,
                explicit: bool) -> bool:
        sizes = [p.numel() for p in self.parameters()]
        values = ([damping.bn_act] if self.module.weight is not None else []) + (
            [damping.bn_err] if getattr(self.module, "bias", None) is not None else [])
        diag = torch.cat([torch.full((k,), v, dtype=torch.float64) for k, v in zip(sizes, values, strict=True)])
        r = damped_inverse(self.F, diag, dtype, use_eigen)
        self.inverse_notes = [f"F: {r.note}"] if r.note else []
        self.F_inv = r.inverse
        return r.inverse is not None

    def clear_inverses(self) -> None:
        self.F_inv = None

    @property
    def has_inverses(self) -> bool:
        return self.F_inv is not None

    def export_inverses(self) -> dict[str, torch.Tensor | float]:
        return {} if self.F_inv is None else {"F.inverse": self.F_inv.detach().clone()}

    def import_inverses(self, state: dict[str, torch.Tensor | float]) -> None:
        inverse = state.get("F.inverse")
        self.F_inv = None if inverse is None else inverse.to(self.parameters()[0].device)

    def _preconditioned(self, grads: list[torch.Tensor], lr_factor: float) -> list[torch.Tensor]:
        v = torch.cat([g.reshape(-1) for g in grads]).to(self.F_inv.dtype)
        p = (self.F_inv @ v).mul_(lr_factor)
        out, start = [], 0
        for g in grads:
            out.append(p[start:start + g.numel()].reshape(g.shape).to(g.dtype))
            start += g.numel()
        return out


class BatchNormBlock(NormBlock):
    """Affine ``nn.BatchNorm1d/2d``: x̂ from the batch's statistics per channel."""

    kind = "batchnorm"

    def normalised(self, a: torch.Tensor) -> torch.Tensor:
        x = a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))
        mean = x.mean(dim=(0, 2), keepdim=True)
        var = x.var(dim=(0, 2), unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.module.eps)


class LayerNormBlock(NormBlock):
    """``nn.LayerNorm`` with an element-wise affine: x̂ from each row's own statistics over the
    normalised (last) dimensions; every other dimension past the batch is a position."""

    kind = "layernorm"

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """(n, positions, features) → (n, features, positions)."""
        features = math.prod(self.module.normalized_shape)
        return t.reshape(t.shape[0], math.prod(t.shape[1:]) // features, features).transpose(1, 2)

    def normalised(self, a: torch.Tensor) -> torch.Tensor:
        x = self._rows(a)
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.module.eps)

    def by_feature(self, g: torch.Tensor) -> torch.Tensor:
        return self._rows(g)


class GroupNormBlock(NormBlock):
    """Affine ``nn.GroupNorm``: x̂ from each sample's statistics over a group of channels."""

    kind = "groupnorm"

    def normalised(self, a: torch.Tensor) -> torch.Tensor:
        n, c = a.shape[0], a.shape[1]
        x = a.reshape(n, self.module.num_groups, math.prod(a.shape[1:]) // self.module.num_groups)
        mean = x.mean(dim=2, keepdim=True)
        var = x.var(dim=2, unbiased=False, keepdim=True)
        return ((x - mean) * torch.rsqrt(var + self.module.eps)).reshape(n, c, math.prod(a.shape[2:]))
