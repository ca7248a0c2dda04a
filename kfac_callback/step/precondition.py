"""The inverse and preconditioning phases of a step: each owner inverts and preconditions its
layers, then broadcasts them (docs/algorithm.md §4, §5, §6)."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping

import torch

from kfac_callback import messages
from kfac_callback.base import Communicator
from kfac_callback.blocks import Block, Dampings, LinearBlock
from kfac_callback.config import KFACConfig
from kfac_callback.messages import LayerNotes, Printer
from kfac_callback.phases import PhaseClock
from kfac_callback.ranks import exchange

# From this compute interval on, explicit inverses (formed once, then GEMMs) beat Cholesky
# solves at every step (benchmarks/step_time.py).
EXPLICIT_INVERSE_INTERVAL = 5


def compute_inverses(blocks: Mapping[str, Block], owners: Mapping[str, int], rank: int, s: int,
                     damping: Dampings, config: KFACConfig, inverse_dtype: torch.dtype, say: Printer) -> None:
    """Each of this rank's layers recomputes its inverses; the others' are dropped here.

    Prints the inverse times (``print_time``), the robustness ladder's notes and the matrices
    (``print_matrix_summary`` / ``print_matrix``), docs/algorithm.md §4, §7.
    """
    c = config
    for name, block in blocks.items():
        if owners[name] != rank:
            block.clear_inverses()
            continue
        start = time.perf_counter()
        ok = block.compute_inverses(damping, c.use_pi, c.use_eigen, inverse_dtype,
                                    explicit=c.compute_interval_steps >= EXPLICIT_INVERSE_INTERVAL)
        elapsed = time.perf_counter() - start
        if c.print_time and block.has_factors:
            say(messages.inverse_time_line(s, name, elapsed, rank))
        for note in block.inverse_notes:
            say.once(name, "inverse " + note.split(":")[0], messages.layer_note(s, name, note))
        if not ok and block.has_factors:
            say.once(name, "plain", messages.layer_note(s, name, messages.NO_INVERSE))
        if c.print_matrix_summary or c.print_matrix:
            for label in (*block.factor_names, *(f"{f}_inv" for f in block.factor_names)):
                mat = getattr(block, label, None)
                if mat is not None:
                    for line in messages.matrix_lines(s, name, label, mat, c.print_matrix_summary, c.print_matrix):
                        say(line)


def precondition(blocks: Mapping[str, Block], owners: Mapping[str, int], comm: Communicator, s: int,
                 factor: float, notes: LayerNotes, clock: PhaseClock, done: Collection[str] = frozenset()) -> None:
    """Zeroes non-finite gradients, preconditions each owned layer with inverses (learning-rate
    ``factor``), then broadcasts every owner's gradients; layers in ``done`` are left alone."""
    # Gradients are identical on all ranks here, so every rank takes the same decisions.
    for name, block in blocks.items():
        if name in done:
            continue
        if not block.grads_finite():
            notes.zeroed(s, name)
            block.zero_grads()
            if isinstance(block, LinearBlock):
                block.set_batch(None, None)  # the batch route would bring the gradient back
    for name, block in blocks.items():
        if name in done:
            continue
        if owners[name] == comm.rank and block.has_inverses and not block.precondition(factor):
            notes.plain_kept(s, name)
    if comm.world_size > 1:
        with clock("exchange"):
            owned = [[g for name, b in blocks.items() if owners[name] == owner
                      for g in (b.grads() or [])] for owner in range(comm.world_size)]
            exchange.broadcast_owned(comm, owned)
