"""skip_weight_grad: fully connected weights whose gradient K-FAC writes instead of autograd.

A bias-free fully connected layer preconditioned through the batch needs only the batch's
``a`` and ``g`` (docs/algorithm.md §5), so autograd's weight GEMM is wasted work: with
``kfac.skip_weight_grad`` its forward call is wrapped by ``capture.WithoutWeightGrad``, the
layer leaves the gradient all-reduce, and ``step()`` writes the weight gradient here: the
preconditioned one, or exactly the plain one autograd would have accumulated where it cannot.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kfac_callback.base import Communicator
from kfac_callback.blocks import Block, LinearBlock
from kfac_callback.blocks.linalg import all_finite
from kfac_callback.estimation.capture import Capture
from kfac_callback.messages import LayerNotes


def skips(block: Block, a: torch.Tensor, n_global: int) -> bool:
    """Whether this forward call (input rows ``a``) may leave the weight gradient to ``step()``.

    Only where ``step()`` can rebuild exactly what autograd would have accumulated: a
    bias-free fully connected layer whose cheaper route is the (gathered) batch's, of
    ``n_global`` rows. Every rank decides alike (the same global batch N, from
    ``expect_shares`` when the shares differ; the same layers), so every rank leaves the same
    gradients out of the gradient all-reduce. With k micro-batches a step (gradient
    accumulation) N is counted from k of this first one, or from ``expect_shares``; the
    answer holds for all k. (Whether a gradient is left from before, to accumulate onto, is
    known only at ``step()``: the usual loop zeroes gradients between forward and backward.)
    """
    return (isinstance(block, LinearBlock) and not block.has_bias and block.module.weight.requires_grad
            and a.dim() == 2 and block.batch_route_cheaper(n_global))


def precondition_skipped(blocks: Mapping[str, Block], owners: Mapping[str, int], comm: Communicator,
                         skipped: dict[str, list[Capture]], shares: tuple[int, ...] | None, s: int,
                         factor: float, notes: LayerNotes, scale: float = 1.0) -> set[str]:
    """Writes the weight gradients that backward skipped (skip_weight_grad).

    Through the batch (every rank's rows, gathered) where one was offered and no gradient
    is left from before: a non-finite batch zeroes the gradient on every rank (said, as in
    ``precondition``); else the owner writes the preconditioned gradient (learning-rate
    ``factor``), or the plain ``gᵀa`` of the batch where it cannot precondition, and the
    others receive it in the owners' broadcast. Otherwise each rank rebuilds its plain
    ``Σ gᵀa`` (exactly what autograd would have added), combined over ranks in one collective
    (weights n_r/N for uneven ``shares``, docs/algorithm.md §6); the layer then goes the usual
    way (finiteness check, preconditioning). Every rank skipped the same layers and sees the
    same batch flags, so all take the same branches. ``scale``: the grad scaler's loss scale,
    divided out of the captured output gradients.

    Returns:
        The layers finished here.
    """
    done, rebuild = set(), {}
    for name, captures in skipped.items():
        block = blocks[name]
        weight = block.module.weight
        if weight.grad is not None or not block.has_batch:
            rebuild[name] = captures
            continue
        done.add(name)
        a, g = block.batch
        if not block.batch_finite():
            notes.zeroed(s, name)
            weight.grad = torch.zeros_like(weight)
            block.set_batch(None, None)
            continue
        weight.grad = torch.empty_like(weight)  # on the other ranks, filled by the broadcast
        if owners[name] != comm.rank:
            continue
        if block.has_inverses and block.precondition(factor):
            continue
        if block.has_inverses:
            notes.plain_kept(s, name)
        weight.grad = block.weight_grad(a, g)
        if not all_finite(weight.grad):  # finite rows whose product overflowed
            notes.zeroed(s, name)
            weight.grad.zero_()
    if rebuild:
        rebuild_plain(blocks, comm, rebuild, shares, scale)
    return done


def rebuild_plain(blocks: Mapping[str, Block], comm: Communicator, skipped: dict[str, list[Capture]],
                  shares: tuple[int, ...] | None, scale: float = 1.0) -> None:
    """Adds each layer's rank-combined ``Σ gᵀa`` to its gradient (none if no rank saw a backward).

    Combined as the trainer combines gradients (``trainer.gradients.average_gradients``):
    the plain average for equal shares, weights n_r/N for uneven ``shares``.
    """
    plains, seen = [], []
    for name, captures in skipped.items():
        block = blocks[name]
        parts = [block.weight_grad(cap.a, cap.g if scale == 1.0 else cap.g / scale)
                 for cap in captures if cap.complete]
        plains.append(torch.stack(parts).sum(0) if parts else torch.zeros_like(block.module.weight))
        seen.append(float(bool(parts)))
    counts = torch.tensor(seen, dtype=plains[0].dtype, device=plains[0].device)
    if comm.world_size > 1:
        if shares is not None:
            for plain in plains:
                plain.mul_(shares[comm.rank])
        comm.allreduce_sum_([*plains, counts])
        for plain in plains:
            plain /= comm.world_size if shares is None else sum(shares)
    for name, plain, count in zip(skipped, plains, counts.tolist(), strict=True):
        weight = blocks[name].module.weight
        if count:
            weight.grad = plain if weight.grad is None else weight.grad.add_(plain)
