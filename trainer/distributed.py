"""Communicators: the collectives the trainer and the K-FAC callback need.

Every communicator offers the same small interface, so code above it never asks which
backend runs underneath and tests can pass a single-process one:

- ``rank``, ``world_size``, ``local_rank``
- ``allreduce_sum_(tensors)``: sums a list of tensors over ranks, in place
- ``broadcast_(tensors, src)``: copies a list of tensors from rank ``src`` to all, in place
- ``barrier()``
"""

from __future__ import annotations

import torch


class SingleProcess:
    """The communicator of a one-rank run: every collective is the identity."""

    rank = 0
    world_size = 1
    local_rank = 0
    name = "single"

    def allreduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sums ``tensors`` over ranks in place (nothing to do with one rank)."""

    def broadcast_(self, tensors: list[torch.Tensor], src: int) -> None:
        """Copies ``tensors`` from rank ``src`` in place (nothing to do with one rank)."""

    def barrier(self) -> None:
        """Waits for every rank (nothing to wait for with one rank)."""
