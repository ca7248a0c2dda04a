"""Affine ``nn.BatchNorm1d/2d``: one factor over ``[γ; β]`` (docs/algorithm.md §3)."""

from __future__ import annotations

import torch
from torch import nn

from kfac_callback.blocks.base import Block, Dampings
from kfac_callback.blocks.linalg import damped_inverse


class BatchNormBlock(Block):
    """Affine ``nn.BatchNorm1d/2d``: one 2C×2C factor ``F`` over ``[γ; β]`` (docs/algorithm.md §3).

    The factor is built from the NORMALISED input x̂ (batch statistics, as in training mode),
    not the raw input that LBANN's callback used.

    Attributes:
        F: Running average of the factor.
        F_inv: Inverse of the damped factor, or ``None``.
    """

    kind = "batchnorm"
    factor_names = ("F",)

    def __init__(self, name: str, module: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__(name, module)
        self.F: torch.Tensor | None = None
        self.F_inv: torch.Tensor | None = None

    def factor_dims(self) -> list[int]:
        return [2 * self.module.num_features]

    def normalised(self, a: torch.Tensor) -> torch.Tensor:
        """x̂ of a training-mode forward, shaped (n, C, S)."""
        x = a.to(self.dtype).reshape(a.shape[0], a.shape[1], -1)
        mean = x.mean(dim=(0, 2), keepdim=True)
        var = x.var(dim=(0, 2), unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.module.eps)

    def gram_terms(self, a: torch.Tensor, g: torch.Tensor, n_global: int,
                   n_local: int | None = None, keep: int | None = None) -> list[tuple[torch.Tensor, float]]:
        # x̂ under each micro-batch's own statistics, as its forward normalised it: a subsample
        # (keep) takes its rows of x̂, normalised over the whole micro-batch (docs/algorithm.md §3).
        n = a.shape[0] if n_local is None else n_local
        xhat = self.normalised(a)
        gr = g.to(self.dtype).reshape(xhat.shape)
        if keep is not None:
            xhat, gr = xhat[:keep], gr[:keep]
        u = torch.cat([(gr * xhat).sum(dim=2), gr.sum(dim=2)], dim=1)
        # N Σ u uᵀ with u built from e = grad_output·n/N.
        return [(u, n * n / n_global)]

    def _invert(self, damping: Dampings, use_pi: bool, use_eigen: bool, dtype: torch.dtype,
                explicit: bool) -> bool:
        c = self.module.num_features
        diag = torch.cat([torch.full((c,), damping.bn_act, dtype=torch.float64),
                          torch.full((c,), damping.bn_err, dtype=torch.float64)])
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
        self.F_inv = None if inverse is None else inverse.to(self.module.weight.device)

    def _preconditioned(self, grads: list[torch.Tensor], lr_factor: float) -> list[torch.Tensor]:
        v = torch.cat([grads[0].reshape(-1), grads[1].reshape(-1)]).to(self.F_inv.dtype)
        p = (self.F_inv @ v).mul_(lr_factor)
        c = self.module.num_features
        return [p[:c].to(grads[0].dtype), p[c:].to(grads[1].dtype)]
