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

from kfac_callback.estimation.outputs import Bernoulli, Categorical, generator_seed

__all__ = ["generator_seed", "sampled_labels", "output_gradients", "own_rows", "MonteCarloFisher"]


def sampled_labels(logits: torch.Tensor, seed: int, step: int, offset: int, total: int) -> torch.Tensor:
    """One label per row of ``logits`` (n × classes), drawn from softmax(logits).

    ``total`` uniforms are drawn for the global batch, on the CPU in float64; this rank's rows
    are ``offset … offset + n``. Label i is the first class whose cumulative probability
    reaches its uniform (inverse CDF), so it has probability p_i.
    """
    return Categorical().sample(logits, seed, step, offset, total)


def output_gradients(logits: torch.Tensor, labels: torch.Tensor, edges: Sequence[object],
                     distribution: Categorical | Bernoulli | None = None) -> list[torch.Tensor | None]:
    """The gradients of the sampled loss with respect to the captured layer outputs.

    The sampled loss is the true loss's mean over this rank's rows, so G keeps its scale
    (docs/algorithm.md §3); an empty share gives zero gradients. ``edges``: each capture's
    gradient edge (taken at forward, so an in-place op after the layer does not move it).
    ``retain_graph``: the real backward still follows. ``None``: a layer the logits do not
    depend on.
    """
    n = logits.shape[0]
    distribution = distribution or Categorical()
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


class MonteCarloFisher:
    """The fisher=mc part of ``KFACCallback``: a mixin that reads the callback's ``config``,
    ``capture``, ``comm``, ``seed``, ``steps``, ``output`` and announced shares."""

    def sample_fisher(self, logits: torch.Tensor) -> None:
        """kfac.fisher=mc: the output gradients of a loss with labels sampled from the model.

        Call it on every step after the forward pass, before ``loss.backward()``, with the
        step's logits (n × classes for softmax cross-entropy, n × outputs for the Bernoulli
        output; the callback's ``output``). It does nothing unless ``fisher=mc`` and this step
        updates the factors; then it draws one target per sample from the model's prediction and
        differentiates that loss's mean over the rank's rows with respect to the layers'
        outputs (one extra backward, ``.grad`` untouched); the coming ``step()`` builds G and F
        from these gradients, the gradient and the batch route keep the true labels'
        (docs/algorithm.md §3, "Fisher"). With uneven shares call
        ``expect_shares`` first: the labels are drawn over the global batch.
        """
        if self.config.fisher != "mc" or not self.is_update_step():
            return
        calls = [c for layer in self.capture.calls.values() for c in layer if c.g_fisher is None]
        if not calls:
            return
        offset, total = own_rows(self._expected, logits.shape[0], self.comm.rank, self.comm.world_size)
        labels = self.output.sample(logits, self.seed, self.steps, offset, total)
        grads = output_gradients(logits, labels, [c.edge for c in calls], self.output)
        for capture, g in zip(calls, grads, strict=True):
            capture.g_fisher = None if g is None else g.detach()
