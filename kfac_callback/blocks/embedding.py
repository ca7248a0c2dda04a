"""``nn.Embedding``: a Kronecker block whose input factor is diagonal (docs/algorithm.md §3).

A lookup is a fully connected layer on a one-hot input: ``y = W[i] = Wᵀ onehot(i)``. The
one-hots of different tokens are orthogonal, so the input factor ``A = (1/N) Σ onehot onehotᵀ``
is diagonal: each token's count over the batch, divided by N. Every token of a sequence shares
the weight; the counts are the expand approximation (a row per token), always.
"""

from __future__ import annotations

import torch
from torch import nn

from kfac_callback.blocks.base import Block, Dampings
from kfac_callback.blocks.linalg import damped_inverse, pi_factor_diagonal


class EmbeddingBlock(Block):
    """``nn.Embedding`` (dense gradients): A, the token counts / N (a vector), and G = (N/R) Σ e eᵀ
    over the R tokens of each sample. The weight (vocabulary × width) preconditions as
    ``diag(A + λπ)⁻¹ ∇W (G + λ/π)⁻¹``.

    Attributes:
        A: Running average of the diagonal input factor, a vector over the vocabulary.
        G: Running average of the output-gradient factor (width × width).
    """

    kind = "embedding"
    factor_names = ("A", "G")

    def __init__(self, name: str, module: nn.Embedding) -> None:
        super().__init__(name, module)
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.A_inv: torch.Tensor | None = None
        self.G_inv: torch.Tensor | None = None
        self.pi = 1.0

    def factor_dims(self) -> list[int]:
        return [self.module.num_embeddings, self.module.embedding_dim]

    def factor_shapes(self) -> list[tuple[int, ...]]:
        return [(self.module.num_embeddings,), (self.module.embedding_dim,) * 2]

    def counts(self, tokens: torch.Tensor) -> torch.Tensor:
        """How often each vocabulary entry occurs in ``tokens``."""
        return torch.bincount(tokens.reshape(-1), minlength=self.module.num_embeddings).to(self.dtype)

    def contributions(self, a: torch.Tensor | list[torch.Tensor], g: torch.Tensor | list[torch.Tensor],
                      n_global: int, keep: int | None = None) -> list[torch.Tensor]:
        a, g = ([a], [g]) if isinstance(a, torch.Tensor) else (list(a), list(g))
        n_local = sum(x.shape[0] for x in a)
        left = n_local if keep is None else keep
        counts = torch.zeros(self.module.num_embeddings, dtype=self.dtype, device=self.module.weight.device)
        gram = None
        for tokens, grad in zip(a, g, strict=True):
            take = min(left, tokens.shape[0])
            left -= take
            tokens, grad = tokens[:take], grad[:take]
            positions = max(1, tokens[0].numel() if take else 1)
            counts += self.counts(tokens)
            rows = grad.to(self.dtype).reshape(-1, grad.shape[-1])
            # G = N Σ e eᵀ / R with e = grad_output·n/N (docs/algorithm.md §3, "Weight sharing").
            part = (rows.mT @ rows).mul_(n_local * n_local / (n_global * positions))
            gram = part if gram is None else gram + part
        return [counts / n_global, gram]

    def accumulate(self, a: torch.Tensor | list[torch.Tensor], g: torch.Tensor | list[torch.Tensor],
                   n_global: int, decay: float, keep: int | None = None) -> bool:
        return self.update_factors(self.contributions(a, g, n_global, keep), decay)

    def _invert(self, damping: Dampings, use_pi: bool, use_eigen: bool, dtype: torch.dtype,
                explicit: bool) -> bool:
        self.pi = pi_factor_diagonal(self.A, self.G) if use_pi else 1.0
        g = damped_inverse(self.G, damping.err / self.pi, dtype, use_eigen)
        self.inverse_notes = [f"G: {g.note}"] if g.note else []
        if g.inverse is None:
            return False
        self.A_inv = (self.A.to(dtype) + damping.act * self.pi).reciprocal()
        self.G_inv = g.inverse
        return True

    def clear_inverses(self) -> None:
        self.A_inv = self.G_inv = None

    @property
    def has_inverses(self) -> bool:
        return self.A_inv is not None and self.G_inv is not None

    def export_inverses(self) -> dict[str, torch.Tensor | float]:
        if not self.has_inverses:
            return {}
        return {"pi": self.pi, "A.inverse": self.A_inv.detach().clone(), "G.inverse": self.G_inv.detach().clone()}

    def import_inverses(self, state: dict[str, torch.Tensor | float]) -> None:
        device = self.module.weight.device
        a, g = state.get("A.inverse"), state.get("G.inverse")
        self.A_inv = None if a is None or g is None else a.to(device)
        self.G_inv = None if a is None or g is None else g.to(device)
        self.pi = float(state.get("pi", 1.0))

    def _preconditioned(self, grads: list[torch.Tensor], lr_factor: float) -> list[torch.Tensor]:
        weight = grads[0]
        p = (self.A_inv[:, None] * weight.to(self.G_inv.dtype)) @ self.G_inv
        return [p.mul_(lr_factor).to(weight.dtype)]
