"""The communicator of an initialised ``torch.distributed`` process group (gloo, NCCL, ...).

A loop started by ``torchrun`` (or any launcher that calls ``init_process_group``), with a
``DistributedDataParallel`` model or without, needs no communicator of ours: the callback
takes this one when none is given (docs/design.md). Every collective is one call on one
flat buffer, as the Communicator protocol asks (docs/algorithm.md §6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat buffer holding ``tensors`` (the tensor's own memory when there is one, contiguous)."""
    if len(tensors) == 1 and tensors[0].is_contiguous():
        return tensors[0].detach().reshape(-1)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copies ``flat`` back into ``tensors`` (nothing to do when it is their own memory)."""
    if len(tensors) == 1 and flat.device == tensors[0].device and flat.data_ptr() == tensors[0].data_ptr():
        return
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def initialised_world() -> bool:
    """Whether ``torch.distributed`` has a default process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ProcessGroupComm:
    """``torch.distributed`` collectives on a process group (default: the whole world).

    Args:
        group: The process group (a DDP model's ``process_group``), or ``None`` for the world.

    Attributes:
        rank, world_size: This process's place in the group.
        local_rank: ``LOCAL_RANK`` of torchrun where set, else the rank.
        name: The backend (``gloo``, ``nccl``, ...).
    """

    def __init__(self, group: Any = None) -> None:
        import os

        import torch.distributed as dist

        self._dist = dist
        self.group = None if group is None or group is dist.group.WORLD else group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        self.name = str(dist.get_backend(self.group))

    def allreduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sums ``tensors`` over the group's ranks in place, in one all_reduce."""
        if not tensors:
            return
        flat = flatten(tensors)
        self._dist.all_reduce(flat, group=self.group)
        unflatten(flat, tensors)

    def broadcast_(self, tensors: list[torch.Tensor], src: int) -> None:
        """Copies ``tensors`` from the group's rank ``src`` to all its ranks, in one broadcast."""
        if not tensors:
            return
        flat = flatten(tensors)
        root = src if self.group is None else self._dist.get_global_rank(self.group, src)
        self._dist.broadcast(flat, src=root, group=self.group)
        unflatten(flat, tensors)

    def barrier(self) -> None:
        """Waits for every rank of the group."""
        self._dist.barrier(group=self.group)
