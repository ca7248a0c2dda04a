"""A step's rows per layer: its micro-batches' inputs and output gradients, as the factors,
the batch route and kl_clip read them (docs/algorithm.md §3)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from kfac_callback.estimation.capture import Capture, micro_batches


@dataclasses.dataclass
class StepRows:
    """One layer's rows of a step: its micro-batches' inputs and output gradients (loss scale
    removed), and whether they are every forward call it had (so the gradient is their gᵀa)."""

    a: list[torch.Tensor]
    g: list[torch.Tensor]
    every_call: bool

    @property
    def n(self) -> int:
        """This rank's samples of the step, over every micro-batch."""
        return sum(x.shape[0] for x in self.a)

    def joined(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batches' rows, one after another."""
        if len(self.a) == 1:
            return self.a[0], self.g[0]
        return torch.cat(self.a), torch.cat(self.g)


def step_rows(calls: dict[str, list[Capture]], k: int, scale: float, fisher: bool = False) -> dict[str, StepRows]:
    """Per layer backward reached, its k micro-batches' rows (``capture.micro_batches``), the
    output gradients divided by the loss ``scale``; ``fisher``: the sampled loss's (mc).

    Raises:
        ValueError: ``fisher`` and a layer without a sampled output gradient.
    """
    rows = {}
    for name, layer_calls in calls.items():
        chosen = micro_batches(layer_calls, k)
        if not chosen or not all(c.complete for c in chosen):
            continue
        if fisher and any(c.g_fisher is None for c in chosen):
            raise ValueError(f"K-FAC: kfac.fisher=mc: layer {name} has no sampled output gradient; call "
                             "sample_fisher(logits) after the forward pass, before backward, every step")
        g = [c.g_fisher if fisher else c.g if scale == 1.0 else c.g / scale for c in chosen]
        every = len(chosen) == len(layer_calls) == k
        rows[name] = StepRows([c.a for c in chosen], g, every)
    return rows


def batchless(calls: dict[str, list[Capture]]) -> list[str]:
    """Layers whose input's first dimension is not the step's batch (the size most layers see):
    a position embedding called on ``arange(T)``, say, whose gradient sums over samples that its
    capture cannot tell apart, so it has no per-sample rows (docs/algorithm.md §3, "Layers")."""
    sizes = {name: layer[0].a.shape[0] if layer[0].a.dim() else -1 for name, layer in calls.items() if layer}
    if not sizes:
        return []
    batch = Counter(sizes.values()).most_common(1)[0][0]
    return [name for name, size in sizes.items() if size != batch]
