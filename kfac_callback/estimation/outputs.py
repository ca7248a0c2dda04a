"""The model's output distribution: what K-FAC samples the Fisher from and whose curvature it uses.

A classifier's logits parametrise a categorical distribution (softmax cross-entropy); an
autoencoder's parametrise one Bernoulli per pixel (sigmoid cross-entropy, summed over the
pixels). Each distribution gives, per sample, the loss summed over its outputs, a target drawn
from the model's own prediction (``kfac.fisher=mc``) and the loss's Hessian with respect to the
logits applied to a vector, which is the output curvature of the Fisher / generalised
Gauss-Newton matrix (docs/algorithm.md §3 "Fisher", §9).

Targets are drawn over the GLOBAL batch from a generator seeded with (seed, step): every rank
draws the batch's uniforms and keeps its own rows', so R ranks sample what one rank samples and
a resumed run what the run it continues would have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: (seed, step) pairs map to distinct seeds


def generator_seed(seed: int, step: int) -> int:
    """The generator's seed for step ``step`` of a run seeded ``seed`` (a 63-bit integer)."""
    return (seed * MIX + step) % (1 << 63)


def own_uniforms(shape: tuple[int, ...], seed: int, step: int, offset: int, total: int) -> torch.Tensor:
    """This rank's rows ``offset … offset + shape[0]`` of ``total`` rows of float64 uniforms."""
    gen = torch.Generator(device="cpu").manual_seed(generator_seed(seed, step))
    return torch.rand((total, *shape[1:]), generator=gen, dtype=torch.float64)[offset:offset + shape[0]]


class Categorical:
    """Softmax over the last dimension; targets are class indices (``F.cross_entropy``)."""

    name = "categorical"

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss summed over the rows."""
        return F.cross_entropy(logits, targets, reduction="sum")

    def sample(self, logits: torch.Tensor, seed: int, step: int, offset: int, total: int) -> torch.Tensor:
        """One label per row drawn from softmax(logits): the first class whose cumulative
        probability reaches the row's uniform (inverse CDF)."""
        u = own_uniforms((logits.shape[0],), seed, step, offset, total)
        cdf = torch.softmax(logits.detach().to(torch.float64), dim=-1).cumsum(dim=-1)
        labels = torch.searchsorted(cdf, u.to(cdf.device).unsqueeze(1)).squeeze(1)
        return labels.clamp_(max=logits.shape[-1] - 1)  # a uniform above a rounded-down last sum

    def curvature(self, logits: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H v per row, H = diag(p) − p pᵀ with p = softmax(logits): the Hessian of the loss."""
        p = torch.softmax(logits, dim=-1)
        return p * v - p * (p * v).sum(-1, keepdim=True)


class Bernoulli:
    """One sigmoid per output; targets are probabilities in [0, 1] (sigmoid cross-entropy,
    summed over the outputs)."""

    name = "bernoulli"

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss summed over the rows and the outputs."""
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="sum")

    def sample(self, logits: torch.Tensor, seed: int, step: int, offset: int, total: int) -> torch.Tensor:
        """One 0/1 target per output, 1 with probability sigmoid(logit)."""
        u = own_uniforms(tuple(logits.shape), seed, step, offset, total).to(logits.device)
        return (u < torch.sigmoid(logits.detach().to(torch.float64))).to(logits.dtype)

    def curvature(self, logits: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H v per row, H = diag(p (1 − p)) with p = sigmoid(logits)."""
        p = torch.sigmoid(logits)
        return p * (1 - p) * v


DISTRIBUTIONS = {"categorical": Categorical, "bernoulli": Bernoulli}


def make_distribution(name: str) -> Categorical | Bernoulli:
    """The distribution called ``name`` (``categorical`` or ``bernoulli``)."""
    try:
        return DISTRIBUTIONS[name]()
    except KeyError:
        raise ValueError(f"K-FAC: unknown output distribution {name!r}; choose one of "
                         f"{', '.join(DISTRIBUTIONS)}") from None
