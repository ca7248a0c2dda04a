"""kfac.fisher=mc: output-gradient factors from labels sampled from the model's predictions.

The empirical Fisher (the default) builds G from the true labels' gradients; the true Fisher
takes the expectation over labels drawn from the model's own predictive distribution
softmax(logits). One sampled label per input gives its Monte-Carlo estimate: one extra
backward of the sampled loss, to the captured layer outputs only (``.grad`` is untouched and
the real backward follows), on factor-update steps (docs/algorithm.md §3, "Fisher").

The labels are drawn over the GLOBAL batch from a generator seeded with (seed, step), each
rank inverting the uniforms of its own rows through its rows' predictive CDF: any number of
ranks draws the labels one rank draws, and a resumed run draws what the run it continues
would have.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: (seed, step) pairs map to distinct seeds


def generator_seed(seed: int, step: int) -> int:
    """The generator's seed for step ``step`` of a run seeded ``seed`` (a 63-bit integer)."""
    return (seed * MIX + step) % (1 << 63)


def sampled_labels(logits: torch.Tensor, seed: int, step: int, offset: int, total: int) -> torch.Tensor:
    """One label per row of ``logits`` (n × classes), drawn from softmax(logits).

    ``total`` uniforms are drawn for the global batch, on the CPU in float64; this rank's rows
    are ``offset … offset + n``. Label i is the first class whose cumulative probability
    reaches its uniform (inverse CDF), so it has probability p_i.
    """
    gen = torch.Generator(device="cpu").manual_seed(generator_seed(seed, step))
    n, classes = logits.shape
    u = torch.rand(total, generator=gen, dtype=torch.float64)[offset:offset + n]
    cdf = torch.softmax(logits.detach().to(torch.float64), dim=-1).cumsum(dim=-1)
    labels = torch.searchsorted(cdf, u.to(cdf.device).unsqueeze(1)).squeeze(1)
    return labels.clamp_(max=classes - 1)  # a uniform above a rounded-down last sum


def output_gradients(logits: torch.Tensor, labels: torch.Tensor, edges: Sequence[object]) -> list[torch.Tensor | None]:
    """The gradients of the sampled loss with respect to the captured layer outputs.

    The sampled loss is the true loss's mean over this rank's rows, so G keeps its scale
    (docs/algorithm.md §3); an empty share gives zero gradients. ``edges``: each capture's
    gradient edge (taken at forward, so an in-place op after the layer does not move it).
    ``retain_graph``: the real backward still follows. ``None``: a layer the logits do not
    depend on.
    """
    n = logits.shape[0]
    loss = F.cross_entropy(logits, labels, reduction="sum") / n if n else logits.sum() * 0
    return list(torch.autograd.grad(loss, list(edges), retain_graph=True, allow_unused=True))


def own_rows(shares: Sequence[int] | None, n: int, rank: int, world: int) -> tuple[int, int]:
    """``(offset, N)``: where this rank's n rows start in the global batch, and its size.

    Raises:
        ValueError: ``shares`` that do not give this rank ``n`` samples.
    """
    if shares is None:
        return rank * n, world * n
    if shares[rank] != n:
        raise ValueError(f"K-FAC: sample_fisher: {n} logits rows on rank {rank}, whose share is "
                         f"{shares[rank]} (expect_shares)")
    return sum(shares[:rank]), sum(shares)


class MonteCarloFisher:
    """The fisher=mc part of ``KFACCallback``: a mixin that reads the callback's ``config``,
    ``capture``, ``comm``, ``seed``, ``steps`` and announced shares."""

    def sample_fisher(self, logits: torch.Tensor) -> None:
        """kfac.fisher=mc: the output gradients of a loss with labels sampled from the model.

        Call it on every step after the forward pass, before ``loss.backward()``, with the
        step's logits (n × classes, softmax cross-entropy). It does nothing unless
        ``fisher=mc`` and this step updates the factors; then it draws one label per sample
        from softmax(logits) and differentiates that loss's mean over the rank's rows with
        respect to the layers' outputs (one extra backward, ``.grad`` untouched); the coming
        ``step()`` builds G and F from these gradients, the gradient and the batch route
        keep the true labels' (docs/algorithm.md §3, "Fisher"). With uneven shares call
        ``expect_shares`` first: the labels are drawn over the global batch.
        """
        if self.config.fisher != "mc" or not self.is_update_step():
            return
        calls = [c for layer in self.capture.calls.values() for c in layer if c.g_fisher is None]
        if not calls:
            return
        offset, total = own_rows(self._expected, logits.shape[0], self.comm.rank, self.comm.world_size)
        labels = sampled_labels(logits, self.seed, self.steps, offset, total)
        grads = output_gradients(logits, labels, [c.edge for c in calls])
        for capture, g in zip(calls, grads, strict=True):
            capture.g_fisher = None if g is None else g.detach()
