"""Kronecker-factored blocks: layers whose curvature is approximated by ``A ⊗ G``.

The inverses, their checkpoint form, and ``G⁻¹ [∇W | ∇b] A⁻¹`` (docs/algorithm.md §5); the
factor contributions are the subclasses' (``linear.py``, ``conv.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from kfac_callback.blocks.base import Block, Dampings
from kfac_callback.blocks.linalg import DampedInverse, damped_inverse, pi_factor


class KroneckerBlock(Block):
    """A layer whose curvature is ``A ⊗ G`` (fully connected and convolution layers).

    Attributes:
        A: Running average of the activation factor (with the bias row/column last).
        G: Running average of the output-gradient factor.
        A_inv, G_inv: Inverses of the damped factors, or ``None``.
    """

    factor_names = ("A", "G")

    def __init__(self, name: str, module: nn.Module, weight_sharing: str = "expand") -> None:
        super().__init__(name, module)
        self.weight_sharing = weight_sharing
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self._a_inv: DampedInverse | None = None
        self._g_inv: DampedInverse | None = None
        self.pi = 1.0

    @property
    def A_inv(self) -> torch.Tensor | None:  # noqa: N802 (the paper's name)
        """The inverse of the damped A (formed from its Cholesky factor on first use)."""
        return None if self._a_inv is None else self._a_inv.inverse

    @property
    def G_inv(self) -> torch.Tensor | None:  # noqa: N802 (the paper's name)
        """The inverse of the damped G (formed from its Cholesky factor on first use)."""
        return None if self._g_inv is None else self._g_inv.inverse

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias (an extra input of constant 1)."""
        return getattr(self.module, "bias", None) is not None

    def out_features(self) -> int:
        """Rows of the weight viewed as a matrix."""
        return self.module.weight.shape[0]

    def in_features(self) -> int:
        """Columns of the weight viewed as a matrix, without the bias column."""
        return self.module.weight[0].numel()

    def factor_dims(self) -> list[int]:
        return [self.in_features() + int(self.has_bias), self.out_features()]

    def _with_ones(self, rows: torch.Tensor, value: float = 1.0) -> torch.Tensor:
        """``rows`` with the bias's input (``value``) as a last column, where there is a bias."""
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_full((*rows.shape[:-1], 1), value)], dim=-1)

    def shared_terms(self, a: torch.Tensor, g: torch.Tensor, n: int,
                     n_global: int) -> list[tuple[torch.Tensor, float]]:
        """The factors' rows and scales from inputs ``a`` (n × R × [groups ×] in) and output gradients
        ``g`` (n × R × [groups ×] out) over R positions that share the weight (docs/algorithm.md §3,
        "Weight sharing"); the rows keep the groups' dimension before the columns.

        expand: every position a row, A = (1/N) Σ_i Σ_r ā āᵀ and G = (N/R) Σ_i Σ_r e eᵀ;
        reduce: one row per sample, summed over its positions, A = (1/(NR)) Σ_i (Σ_r ā)(Σ_r ā)ᵀ
        and G = (N/R) Σ_i (Σ_r e)(Σ_r e)ᵀ; e = grad_output·n/N. Both are the per-sample block
        when R = 1.
        """
        positions = a.shape[1]
        if self.weight_sharing == "reduce" and positions > 1:
            summed = self._with_ones(a.sum(dim=1), float(positions))
            return [(summed, 1.0 / (n_global * positions)), (g.sum(dim=1), n * n / (n_global * positions))]
        rows = self._with_ones(a.reshape(-1, *a.shape[2:]))
        return [(rows, 1.0 / n_global), (g.reshape(-1, *g.shape[2:]), n * n / (n_global * positions))]

    def _invert(self, damping: Dampings, use_pi: bool, use_eigen: bool, dtype: torch.dtype,
                explicit: bool) -> bool:
        self.pi = pi_factor(self.A, self.G) if use_pi else 1.0
        chol = not use_eigen
        a = damped_inverse(self.A, damping.act * self.pi, dtype, use_eigen, cholesky_only=chol)
        g = damped_inverse(self.G, damping.err / self.pi, dtype, use_eigen, cholesky_only=chol)
        self.inverse_notes = [f"{n}: {r.note}" for n, r in (("A", a), ("G", g)) if r.note]
        if a.inverse is None or g.inverse is None:
            return False
        if chol and explicit:
            # Inverses reused over many steps: forming them once makes every later product a
            # GEMM, about twice as fast here as the two triangular solves of a Cholesky solve.
            self._a_inv = DampedInverse(inverse=torch.cholesky_inverse(a.inverse))
            self._g_inv = DampedInverse(inverse=torch.cholesky_inverse(g.inverse))
        elif chol:
            self._a_inv, self._g_inv = DampedInverse(chol=a.inverse), DampedInverse(chol=g.inverse)
        else:
            self._a_inv, self._g_inv = DampedInverse(inverse=a.inverse), DampedInverse(inverse=g.inverse)
        return True

    def clear_inverses(self) -> None:
        self._a_inv = self._g_inv = None

    @property
    def has_inverses(self) -> bool:
        return self._a_inv is not None and self._g_inv is not None

    def export_inverses(self) -> dict[str, torch.Tensor | float]:
        if not self.has_inverses:
            return {}
        state: dict[str, torch.Tensor | float] = {"pi": self.pi}
        for factor, inv in (("A", self._a_inv), ("G", self._g_inv)):
            # Both forms as held: the lazily formed explicit inverse is kept too, so a resumed
            # run multiplies by exactly the same tensors.
            for key, tensor in (("chol", inv.chol), ("inverse", inv._inverse)):
                if tensor is not None:
                    state[f"{factor}.{key}"] = tensor.detach().clone()
        return state

    def import_inverses(self, state: dict[str, torch.Tensor | float]) -> None:
        device = self.module.weight.device
        held = []
        for factor in ("A", "G"):
            chol, inverse = state.get(f"{factor}.chol"), state.get(f"{factor}.inverse")
            held.append(None if chol is None and inverse is None else DampedInverse(
                chol=None if chol is None else chol.to(device),
                inverse=None if inverse is None else inverse.to(device)))
        self._a_inv, self._g_inv = held
        if not self.has_inverses:
            self._a_inv = self._g_inv = None
        self.pi = float(state.get("pi", 1.0))

    def _batch_product(self) -> torch.Tensor | None:
        """The preconditioned ``[∇W | ∇b]`` computed another way, where a subclass has one."""
        return None

    def _grad_matrix(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """``[∇W | ∇b]`` with ∇W viewed as out × in (conv: C_out × C_in·kh·kw)."""
        gw = grads[0].reshape(self.out_features(), -1)
        if self.has_bias:
            gw = torch.cat([gw, grads[1].reshape(-1, 1)], dim=1)
        return gw

    def _preconditioned(self, grads: list[torch.Tensor], lr_factor: float) -> list[torch.Tensor]:
        p = self._batch_product()
        if p is None:
            mat = self._grad_matrix(grads).to(self._g_inv.dtype)
            # G⁻¹ M A⁻¹: two solves with Cholesky factors, or two GEMMs with explicit inverses.
            p = self._a_inv.solve_right(self._g_inv.solve(mat))
        if lr_factor != 1.0:
            p = p.mul(lr_factor)
        return self._split(p, grads)

    def _split(self, p: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The preconditioned ``[∇W | ∇b]`` back in each parameter's own layout."""
        # Conv: not transposed, unlike LBANN.
        weight = grads[0]
        out = [p[:, :self.in_features()].reshape(weight.shape).to(weight.dtype)]
        if self.has_bias:
            out.append(p[:, -1].reshape(grads[1].shape).to(grads[1].dtype))
        return out
