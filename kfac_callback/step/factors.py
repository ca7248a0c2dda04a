"""The factor phase of a step: this step's rows into the running averages, and the fully
connected layers' batches for the batch route (docs/algorithm.md §3, §5, §6)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kfac_callback.base import Communicator
from kfac_callback.blocks import Block, LinearBlock
from kfac_callback.estimation.rows import StepRows
from kfac_callback.estimation.subsample import factor_batch
from kfac_callback.messages import LayerNotes
from kfac_callback.phases import PhaseClock
from kfac_callback.ranks import exchange
from kfac_callback.ranks.shares import global_batch


def update_factors(blocks: Mapping[str, Block], rows: Mapping[str, StepRows], shares: tuple[int, ...] | None,
                   comm: Communicator, decay: float, limit: int, s: int, notes: LayerNotes,
                   clock: PhaseClock) -> None:
    """Folds this step's factors into the running averages (summed over ranks first).

    Each rank's contribution takes its own n (every micro-batch's rows) and the global N
    (docs/algorithm.md §3); a rank without samples contributes zeros. With
    ``factor_batch_size`` (``limit``) only each rank's first m_r samples count, M in place of N.
    """
    world = comm.world_size
    if world == 1:
        # One rank: each layer's batch factors go straight into its running averages.
        for name, block in blocks.items():
            r = rows.get(name)
            if r is None:
                continue
            m, keep = factor_batch(limit, r.n, 1, 0, None)  # a subsample (docs/algorithm.md §3)
            if not block.accumulate(r.a, r.g, r.n if m is None else m, decay, keep):
                notes.bad_factor(s, name)
        return
    if not blocks:
        return
    contributions = []
    for name, block in blocks.items():
        r = rows.get(name)
        if r is None:
            contributions.append(None)
            continue
        m, keep = factor_batch(limit, r.n, world, comm.rank, shares)
        contributions.append(block.contributions(r.a, r.g, global_batch(r.n, shares, world) if m is None else m,
                                                 keep))
    dtype = exchange.widest_dtype([b.module.weight for b in blocks.values()], torch.float32)
    device = next(iter(blocks.values())).module.weight.device
    with clock("factor_allreduce"):
        summed = exchange.sum_factors(comm, contributions, [b.factor_shapes() for b in blocks.values()], dtype, device)
    for (name, block), mats in zip(blocks.items(), summed, strict=True):
        # None: some rank saw no forward/backward of this layer this step.
        if mats is not None and not block.update_factors(mats, decay):
            notes.bad_factor(s, name)


def offer_batches(blocks: Mapping[str, Block], rows: Mapping[str, StepRows], shares: tuple[int, ...] | None,
                  comm: Communicator) -> None:
    """Lets fully connected layers precondition through this step's batch (cheaper).

    A layer qualifies when each of its forward calls since the last step was one
    micro-batch (no weight sharing), so that its gradient is exactly ``gᵀa`` of the step's
    rows (every micro-batch's, joined), and when that route costs fewer flops. With
    several ranks the combined gradient is ``Σ_r (n_r/N) g_rᵀ a_r`` (``(1/R) Σ_r g_rᵀ a_r``
    for equal shares): the ranks' ``a`` and ``g`` rows are gathered in one collective,
    each rank's ``g`` weighted by n_r/N, far fewer numbers than the gradient itself for the
    MLP (N·(in+out) vs in·out) (docs/algorithm.md §5, §6). A layer takes the batch route
    only when every rank could offer it, so all decide alike.
    """
    world = comm.world_size
    linear = {n: b for n, b in blocks.items() if isinstance(b, LinearBlock)}
    usable = {}
    for name, block in linear.items():
        block.set_batch(None, None)
        r = rows.get(name)
        usable[name] = (r is not None and r.every_call and all(x.dim() == 2 for x in r.a)
                        and block.batch_route_cheaper(global_batch(r.n, shares, world)))
    joined = {n: rows[n].joined() for n in linear if usable[n]}
    if world == 1 or not joined:
        # Several ranks with none present: no captures on any rank (the schedule is the same everywhere).
        for name, (a, g) in joined.items():
            linear[name].set_batch(a, g)
        return
    first = next(iter(joined.values()))[0]
    counts = [first.shape[0]] * world if shares is None else shares
    mine = counts[comm.rank]
    # Uneven shares: this rank's g rows carry its weight n_r/N into the gathered batch;
    # equal ones are divided by R after the gather, as they always were.
    weight = None if shares is None else mine / sum(shares)
    offered = [joined.get(n) if usable[n] and joined[n][0].shape[0] == mine else None for n in linear]
    offered = [None if pair is None else (pair[0], pair[1] if weight is None else pair[1] * weight)
               for pair in offered]
    dims = [(b.in_features(), b.out_features()) for b in linear.values()]
    # At least float32 (a bf16 capture under autocast), as the factors: MPI has no bf16.
    dtype = torch.promote_types(first.dtype, torch.float32)
    gathered = exchange.gather_rows(comm, offered, counts, dims, dtype, first.device)
    for block, batch in zip(linear.values(), gathered, strict=True):
        if batch is not None:
            block.set_batch(batch[0], batch[1] / world if weight is None else batch[1])
