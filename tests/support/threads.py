"""Ranks as threads: a communicator with real collective semantics, without MPI."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch


class ThreadComm:
    """One rank of a world of threads; records the collectives it was asked for (``calls``)."""

    def __init__(self, rank: int, shared: SimpleNamespace) -> None:
        self.rank, self.world_size, self.local_rank = rank, shared.world, rank
        self.shared = shared
        self.calls: list[str] = []

    def allreduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        self.calls.append("allreduce")
        self.shared.slots[self.rank] = [t.clone() for t in tensors]
        self.shared.barrier.wait()
        for i, t in enumerate(tensors):
            t.copy_(sum(slot[i] for slot in self.shared.slots))
        self.shared.barrier.wait()

    def broadcast_(self, tensors: list[torch.Tensor], src: int) -> None:
        self.calls.append(f"broadcast{src}")
        if self.rank == src:
            self.shared.slots[src] = [t.clone() for t in tensors]
        self.shared.barrier.wait()
        if self.rank != src:
            for t, s in zip(tensors, self.shared.slots[src], strict=True):
                t.copy_(s)
        self.shared.barrier.wait()

    def barrier(self) -> None:
        self.shared.barrier.wait()


def run_ranks(world: int, fn: Callable[[ThreadComm], Any]) -> list[Any]:
    """Runs ``fn(comm)`` on ``world`` thread ranks; their results in rank order (errors re-raised)."""
    shared = SimpleNamespace(world=world, barrier=threading.Barrier(world, timeout=30), slots=[None] * world)
    results: list[Any] = [None] * world

    def main(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(rank, shared))
        except BaseException as exc:  # re-raised in the calling thread
            results[rank] = exc
            shared.barrier.abort()

    threads = [threading.Thread(target=main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
