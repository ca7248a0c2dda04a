"""A step that goes wrong: an fp16 overflow (the scaler skips it), NaN/Inf in the loss or the
gradients (skip the step, or stop with a checkpoint), a stop signal (checkpoint, then leave),
and weights that are no longer finite (no checkpoint of them is written)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kfac_callback.base import Communicator
from launcher.workdir import PREEMPTED_FILE, atomic_write_text
from trainer.checkpoint import CheckpointPolicy, save_checkpoint
from trainer.gradients import NonFiniteError, describe_nonfinite, nonfinite_parameters


def skip_overflow(scaler: Any, optimizer: torch.optim.Optimizer, step: int, first: bool,
                  log: Callable[[str], None]) -> None:
    """An fp16 step whose scaled gradients overflowed: skipped by the scaler (no optimizer
    step, no K-FAC step: its captures are dropped at the next ``on_batch_begin``); said the
    ``first`` time only."""
    scale = scaler.get_scale()
    scaler.step(optimizer)  # finds the inf and skips
    scaler.update()
    if first:
        log(f"trainer: step {step}: fp16 gradients overflowed at loss scale {scale:g}; step "
            f"skipped, scale now {scaler.get_scale():g} (the scaler's normal start; said once)")
    optimizer.zero_grad(set_to_none=True)


def nonfinite_step(bad_loss: bool, bad: list[str], x: torch.Tensor, where: str, optimizer: torch.optim.Optimizer,
                   on_nonfinite: str, save: Optional[Callable[[], Optional[Path]]], log: Callable[[str], None]) -> None:
    """Reports a NaN/Inf step at ``where``, then skips it (no optimizer step) or, with
    ``on_nonfinite=stop``, stops after a checkpoint (``save``, None: no checkpoints).

    Raises:
        NonFiniteError: ``on_nonfinite`` is ``stop``.
    """
    what = describe_nonfinite(bad_loss, bad, x)
    optimizer.zero_grad(set_to_none=True)
    if on_nonfinite == "skip":
        log(f"trainer: {where}: {what}; step skipped")
        return
    saved = ""
    if save is not None:
        # The weights are still those before this step: resuming retries (or, with
        # trainer.on_nonfinite=skip, skips) this very batch.
        saved = f"; checkpoint {save() or 'written by rank 0'}"
    raise NonFiniteError(f"{where}: {what}; stopped (trainer.on_nonfinite=stop){saved}")


def write_checkpoint(state: dict[str, Any], model: nn.Module, rank: int, step: int, policy: CheckpointPolicy,
                     last: Optional[Path]) -> Optional[Path]:
    """Writes ``state`` on rank 0 (None elsewhere) unless the weights hold NaN/Inf.

    Raises:
        NonFiniteError: The weights are not finite: nothing is written (``last`` is named).
    """
    if rank != 0:
        return None
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(f"step {step}: weights of {', '.join(bad)} are not finite; no checkpoint "
                             f"written (the last good one is {last})")
    return save_checkpoint(state, policy.directory, step, policy.keep)


def stop_on_signal(path: Optional[Path], received: Optional[str], comm: Communicator, work_dir: Optional[str],
                   where: str, log: Callable[[str], None]) -> str:
    """After the agreed step's checkpoint ``path``: leaves the ``preempted`` marker (rank 0),
    waits for every rank and says how to resume. Returns what stopped the run."""
    stopped = received or "a signal to another rank"
    if comm.rank == 0 and work_dir:
        atomic_write_text(Path(work_dir, PREEMPTED_FILE), f"{path}\n")
    comm.barrier()  # no rank leaves before rank 0's checkpoint is on disk
    log(f"trainer: stopped by {stopped} at {where}; checkpoint {path}; resume with trainer.resume={work_dir or path}")
    return stopped
