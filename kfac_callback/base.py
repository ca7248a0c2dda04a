"""What a callback and a communicator are: the Callback base class and the Communicator protocol.

Both live here, below the trainer, so the K-FAC callback needs nothing but torch: the trainer
calls the hooks and passes its communicator; a plain PyTorch loop needs neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

HOOKS = (
    "on_setup_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_batch_begin",
    "on_batch_end",
    "on_forward_prop_end",
    "on_backward_prop_end",
    "on_optimize_begin",
    "on_optimize_end",
    "on_test_begin",
    "on_test_end",
)


class Callback:
    """No-op hooks (LBANN's names) and no-op state; subclasses override what they need.

    Hooks receive the trainer, whose public attributes (``epoch``, ``step``, ``model``,
    ``comm``, ``stats``, and ``shares``: per rank, its samples of the current step) are the
    state a callback may read. The trainer calls every hook of
    every callback in one dispatch loop, in the order the callbacks were given, and saves and
    restores every callback through ``state_dict`` / ``load_state_dict`` under ``state_key``.
    """

    def on_setup_end(self, trainer: Any) -> None:
        """Called once the model, data, optimizer and callbacks are built."""

    def on_train_begin(self, trainer: Any) -> None:
        """Called before the first training epoch."""

    def on_train_end(self, trainer: Any) -> None:
        """Called after the last training epoch (before the final test)."""

    def on_epoch_begin(self, trainer: Any) -> None:
        """Called at the start of each training epoch."""

    def on_epoch_end(self, trainer: Any) -> None:
        """Called after each training epoch, once its statistics are final."""

    def on_batch_begin(self, trainer: Any) -> None:
        """Called before the forward pass of each training mini-batch."""

    def on_batch_end(self, trainer: Any) -> None:
        """Called after the optimizer step of each training mini-batch."""

    def on_forward_prop_end(self, trainer: Any) -> None:
        """Called after the forward pass and loss of each training mini-batch."""

    def on_backward_prop_end(self, trainer: Any) -> None:
        """Called after the backward pass, once gradients are averaged over ranks."""

    def on_optimize_begin(self, trainer: Any) -> None:
        """Called just before the optimizer step."""

    def on_optimize_end(self, trainer: Any) -> None:
        """Called just after the optimizer step."""

    def on_test_begin(self, trainer: Any) -> None:
        """Called before evaluating the test set."""

    def on_test_end(self, trainer: Any) -> None:
        """Called after evaluating the test set, once its statistics are final."""

    @property
    def state_key(self) -> str:
        """The name this callback's state is saved under; two callbacks with state need two keys."""
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly; empty when there is nothing to keep."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``."""


@runtime_checkable
class Communicator(Protocol):
    """The collectives the trainer and the K-FAC callback use, whatever the backend."""

    rank: int
    world_size: int

    def allreduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sums ``tensors`` over ranks in place, in one collective."""

    def broadcast_(self, tensors: list[torch.Tensor], src: int) -> None:
        """Copies ``tensors`` from rank ``src`` to every rank, in place."""


class SingleProcess:
    """The communicator of a one-rank run: every collective is the identity."""

    rank = 0
    world_size = 1
    local_rank = 0
    local_size = 1
    name = "single"

    def allreduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sums ``tensors`` over ranks in place (nothing to do with one rank)."""

    def broadcast_(self, tensors: list[torch.Tensor], src: int) -> None:
        """Copies ``tensors`` from rank ``src`` in place (nothing to do with one rank)."""

    def barrier(self) -> None:
        """Waits for every rank (nothing to wait for with one rank)."""


def rank0_print(comm: Communicator | None) -> Callable[[str], None]:
    """A print function that writes (and flushes) on rank 0 only."""

    def _print(line: str) -> None:
        if comm is None or comm.rank == 0:
            print(line, flush=True)

    return _print
