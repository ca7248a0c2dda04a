"""``nn.Linear``: its factors, and preconditioning through the batch (docs/algorithm.md §3, §5).

When a layer's gradient is exactly ``gᵀ[a|1]`` of this step's batch (one forward and backward
since the last step), ``G⁻¹ gᵀ`` and ``[a|1] A⁻¹`` can go through the batch's N rows instead
of through the out × in gradient: the callback offers the batch (``set_batch``) and the next
``precondition`` uses it once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kfac_callback.blocks.kronecker import KroneckerBlock
from kfac_callback.blocks.linalg import all_finite


class LinearBlock(KroneckerBlock):
    """``nn.Linear``: ``A = (1/N) Σ ā āᵀ``, ``G = N Σ e eᵀ`` (docs/algorithm.md §3).

    Inputs with more than two dimensions (batch, positions..., features) share the weight
    over their positions: ``weight_sharing`` expand or reduce (``shared_terms``); ``n`` is the
    size of the first dimension.
    """

    kind = "linear"

    def __init__(self, name: str, module: nn.Module, weight_sharing: str = "expand") -> None:
        super().__init__(name, module, weight_sharing)
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def weight_grad(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The weight gradient autograd gives one forward call: ``gᵀa`` over every sample row."""
        rows = a.reshape(-1, a.shape[-1])
        # In the factors' dtype: a bf16/fp16 capture (autocast) is multiplied in float32.
        return (g.reshape(-1, g.shape[-1]).to(self.dtype).mT @ rows.to(self.dtype)).to(self.module.weight.dtype)

    def gram_terms(self, a: torch.Tensor, g: torch.Tensor, n_global: int,
                   n_local: int | None = None, keep: int | None = None) -> list[tuple[torch.Tensor, float]]:
        n = a.shape[0] if n_local is None else n_local
        if keep is not None:  # a subsample: its samples' rows (docs/algorithm.md §3)
            a, g = a[:keep], g[:keep]
        # A = (1/N) Σ ā āᵀ; G = N Σ e eᵀ with e = grad_output·n/N: (n²/N) Σ grad_output grad_outputᵀ,
        # n this rank's own rows, N the global batch (uneven shares too, docs/algorithm.md §3);
        # positions beyond the batch share the weight (expand or reduce).
        positions = math.prod(a.shape[1:-1])
        rows = a.to(self.dtype).reshape(a.shape[0], positions, a.shape[-1])
        return self.shared_terms(rows, g.to(self.dtype).reshape(a.shape[0], positions, g.shape[-1]), n, n_global)

    def set_batch(self, a: torch.Tensor | None, g: torch.Tensor | None) -> None:
        """Offers this step's input and output gradient, whose product is the gradient.

        Valid only when the layer's gradient is exactly ``gᵀ[a|1]`` (one forward and backward
        since the last step; on several ranks ``a`` and ``g`` are every rank's rows, gathered,
        with each rank's ``g`` weighted by its share n_r/N, docs/algorithm.md §6). Then
        ``G⁻¹ gᵀ`` and ``[a|1] A⁻¹`` go through the batch: 2N(out² + in² + out·in) flops
        instead of 2·out·in·(out + in).
        """
        self._batch = None if a is None or g is None else (a, g)

    @property
    def has_batch(self) -> bool:
        """Whether this step's batch was offered (``set_batch``) and not used yet."""
        return self._batch is not None

    @property
    def batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The offered ``(a, g)`` (``set_batch``), or ``None``."""
        return self._batch

    def batch_finite(self) -> bool:
        """Whether a batch was offered and its inputs and output gradients are all finite."""
        return self._batch is not None and all(all_finite(t) for t in self._batch)

    def batch_route_cheaper(self, n: int) -> bool:
        """Whether preconditioning through ``n`` samples costs fewer flops than the direct route."""
        d_out, d_in = self.out_features(), self.in_features() + int(self.has_bias)
        return n * (d_out * d_out + d_in * d_in + d_out * d_in) < d_out * d_in * (d_out + d_in)

    def _batch_halves(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``G⁻¹gᵀ`` (out × N) and ``A⁻¹[a|1]ᵀ`` (in × N), when this step's batch was offered
        and that route is cheaper; their product ``left @ rightᵀ`` is the preconditioned gradient."""
        batch, self._batch = self._batch, None
        if batch is None:
            return None
        a, g = batch
        rows = self._with_ones(a.reshape(-1, a.shape[-1]))
        g = g.reshape(-1, g.shape[-1])
        if not self.batch_route_cheaper(rows.shape[0]):
            return None
        dtype = self._g_inv.dtype
        left = self._g_inv.solve(g.mT.to(dtype))
        right = self._a_inv.solve(rows.mT.to(dtype))  # A⁻¹ is symmetric
        return left, right

    def _batch_product(self) -> torch.Tensor | None:
        """``(G⁻¹gᵀ)([a|1]A⁻¹)`` when this step's batch was offered and that route is cheaper."""
        halves = self._batch_halves()
        return None if halves is None else halves[0] @ halves[1].mT

    def _precondition_in_place(self, grads: list[torch.Tensor], lr_factor: float) -> bool | None:
        weight = grads[0]
        if (self._batch is None or self.has_bias or lr_factor != 1.0 or not weight.is_contiguous()
                or weight.dtype != self._g_inv.dtype):
            return None
        halves = self._batch_halves()
        if halves is None:
            return None
        left, right = halves
        # |(L Rᵀ)_ij| ≤ ‖L‖·‖R‖, so one finite product of norms proves every entry finite: the
        # product can go straight into the gradient, without a check and a copy of its own.
        if not bool(torch.isfinite(left.norm() * right.norm())):
            return False
        torch.mm(left, right.mT, out=weight.view(left.shape[0], right.shape[0]))
        return True
