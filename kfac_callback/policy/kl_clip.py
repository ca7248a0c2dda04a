"""kfac.kl_clip: KAISA's KL-clipping of the preconditioned update (docs/algorithm.md §5).

A preconditioned step lr·P moves the model's predictive distribution by about
½·lr²·⟨P, F P⟩ ≈ ½·lr²·⟨P, ∇⟩ in KL divergence (F P ≈ ∇). Where the damped curvature is small
that is large; so every preconditioned gradient is scaled by

    ν = min(1, sqrt(kl_clip / |Σ_layers lr² ⟨P_layer, ∇_layer⟩|))

with ∇ the plain rank-combined gradient. It runs after the owners' broadcast: every rank holds
the same P and ∇, so every rank computes the same ν. A layer whose plain gradient backward never
formed (skip_weight_grad through the batch) gives ⟨P, gᵀa⟩ = Σ((g P) ∘ a) from its batch rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from kfac_callback.blocks import Block, LinearBlock


def batch_rows(blocks: Mapping[str, Block], skipped: Iterable[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The rows standing for the plain gradient of the layers skip_weight_grad leaves to the
    batch route (no ``.grad`` yet, a batch offered): taken before the route consumes them."""
    rows = {}
    for name in skipped:
        block = blocks[name]
        if isinstance(block, LinearBlock) and block.module.weight.grad is None and block.batch is not None:
            rows[name] = block.batch
    return rows


def plain_grads(blocks: Mapping[str, Block], rows: Mapping[str, object]) -> dict[str, list[torch.Tensor]]:
    """Copies of every other layer's plain gradients, before preconditioning overwrites them."""
    plain = {}
    for name, block in blocks.items():
        grads = None if name in rows else block.grads()
        if grads is not None:
            plain[name] = [g.detach().clone() for g in grads]
    return plain


def _inner(block: Block, plain: list[torch.Tensor] | None, rows: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    """⟨P, ∇⟩ of one layer in float64 (0 without a gradient, or where it is not finite: such a
    gradient was zeroed, docs/algorithm.md §5)."""
    grads = block.grads()
    if grads is None:
        return 0.0
    if rows is not None:
        a, g = rows
        p = grads[0].reshape(grads[0].shape[0], -1).to(torch.float64)
        value = float(((g.to(torch.float64) @ p) * a.to(torch.float64)).sum())
    elif plain is not None:
        value = sum(float((q.to(torch.float64) * d.to(torch.float64)).sum()) for q, d in zip(grads, plain, strict=True))
    else:
        return 0.0
    return value if math.isfinite(value) else 0.0


def clip(blocks: Mapping[str, Block], plain: Mapping[str, list[torch.Tensor]],
         rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]], learning_rate: float, kl_clip: float) -> float:
    """Scales every layer's preconditioned gradient by ν and returns ν (1: nothing to clip)."""
    total = sum(_inner(b, plain.get(name), rows.get(name)) for name, b in blocks.items())
    vg = abs(learning_rate * learning_rate * total)
    nu = 1.0 if vg == 0.0 else min(1.0, math.sqrt(kl_clip / vg))
    if nu < 1.0:
        for block in blocks.values():
            for g in block.grads() or []:
                g.mul_(nu)
    return nu


class KLClip:
    """kl_clip around one step's preconditioning: what ∇ needs is kept before, ν applied after.

    Args:
        kl_clip: c (0: off).

    Attributes:
        nu: ν of the last step (1 until one is clipped).
    """

    def __init__(self, kl_clip: float) -> None:
        self.kl_clip = kl_clip
        self.nu = 1.0

    @property
    def enabled(self) -> bool:
        """Whether ``kl_clip`` > 0."""
        return self.kl_clip > 0

    def keep_rows(self, blocks: Mapping[str, Block], skipped: Iterable[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``batch_rows`` when enabled (before the skipped layers' gradients are written), else none."""
        return batch_rows(blocks, skipped) if self.enabled else {}

    def keep_plain(self, blocks: Mapping[str, Block], rows: Mapping[str, object]) -> dict[str, list[torch.Tensor]]:
        """``plain_grads`` when enabled (before the preconditioning overwrites them), else none."""
        return plain_grads(blocks, rows) if self.enabled else {}

    def apply(self, blocks: Mapping[str, Block], plain: Mapping[str, list[torch.Tensor]],
              rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]], learning_rate: float) -> None:
        """Scales the preconditioned gradients by ν (after the owners' broadcast) and keeps ν."""
        if self.enabled:
            self.nu = clip(blocks, plain, rows, learning_rate, self.kl_clip)
