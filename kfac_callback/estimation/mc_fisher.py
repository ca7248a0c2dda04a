"""kfac.fisher=mc: output-gradient factors from targets sampled from the model's predictions.

The empirical Fisher (the default) builds G from the true targets' gradients; the true Fisher
takes the expectation over targets drawn from the model's own predictive distribution
(softmax(logits) for a classifier, one Bernoulli(sigmoid(logit)) per output for an
autoencoder; ``outputs.py``). One sampled target per input gives its Monte-Carlo estimate: one
extra backward of the sampled loss, to the captured layer outputs only (``.grad`` is untouched
and the real backward follows), on factor-update steps (docs/algorithm.md §3, "Fisher").

The labels are drawn over the GLOBAL batch from a generator seeded with (seed, step), each
rank inverting the uniforms of its own rows through its rows' predictive CDF: any number of
ranks draws the labels one rank draws, and a resumed run draws what the run it continues
would have.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kfac_callback.estimation.capture import Capture
from kfac_callback.estimation.outputs import Bernoulli, Categorical


def output_gradients(logits: torch.Tensor, labels: torch.Tensor, edges: Sequence[object],
                     distribution: Categorical | Bernoulli) -> list[torch.Tensor | None]:
    """The gradients of the sampled loss with respect to the captured layer outputs.

    The sampled loss is the true loss's mean over this rank's rows, so G keeps its scale
    (docs/algorithm.md §3); an empty share gives zero gradients. ``edges``: each capture's
    gradient edge (taken at forward, so an in-place op after the layer does not move it).
    ``retain_graph``: the real backward still follows. ``None``: a layer the logits do not
    depend on.
    """
    n = logits.shape[0]
    loss = distribution.loss_sum(logits, labels) / n if n else logits.sum() * 0
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


def sample_output_gradients(calls: Sequence[Capture], logits: torch.Tensor, output: Categorical | Bernoulli,
                            seed: int, step: int, shares: Sequence[int] | None, rank: int, world: int) -> None:
    """The Fisher sampler: sets each capture's ``g_fisher``, the output gradient of a loss with
    targets drawn from ``output`` at ``logits``.

    The draw is seeded by ``(seed, step)`` over the global batch; this rank's rows are where
    ``shares`` (``None``: equal shares) put them among the ``world`` ranks (``own_rows``).
    """
    offset, total = own_rows(shares, logits.shape[0], rank, world)
    labels = output.sample(logits, seed, step, offset, total)
    grads = output_gradients(logits, labels, [c.edge for c in calls], output)
    for capture, g in zip(calls, grads, strict=True):
        capture.g_fisher = None if g is None else g.detach()
