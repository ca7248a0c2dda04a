"""What a checkpoint holds: the trainer's state assembled and restored, RNGs included.

``checkpoint.py`` writes and reads the files; this module decides what is in them. Every
callback is saved through its ``state_dict()`` under its ``state_key`` (the Callback base's
no-ops save nothing), so the K-FAC callback's factors and inverses travel with the weights.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from kfac_callback.base import Callback
from trainer.checkpoint import FORMAT, VERSION


def rng_state() -> dict[str, Any]:
    """The torch, Python and numpy generators (and CUDA's, where present) as checkpoint data."""
    np_state = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
           "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: Mapping[str, Any]) -> None:
    """Restores what ``rng_state()`` returned."""
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    pos, has_gauss, cached = rng["numpy_rest"]
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` wants tuples; a loaded checkpoint may hand back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def callback_states(callbacks: Iterable[Callback]) -> dict[str, dict[str, Any]]:
    """Every callback's non-empty ``state_dict()`` under its ``state_key`` (collectives on every rank).

    Raises:
        ValueError: If two callbacks with state share a key (one would overwrite the other).
    """
    states: dict[str, dict[str, Any]] = {}
    for cb in callbacks:
        state = cb.state_dict()
        if not state:
            continue
        if cb.state_key in states:
            raise ValueError(f"two callbacks save their state under {cb.state_key!r}: give one "
                             "of them its own state_key")
        states[cb.state_key] = state
    return states


def load_callback_states(callbacks: Iterable[Callback], states: Mapping[str, Any]) -> None:
    """Hands each callback its saved state (those without one keep theirs)."""
    for cb in callbacks:
        if cb.state_key in states:
            cb.load_state_dict(states[cb.state_key])


def trainer_state(trainer: Any, epoch_done: bool = False) -> dict[str, Any]:
    """Everything a resumed run needs to continue bit for bit (a collective with several ranks).

    Args:
        trainer: The trainer to save.
        epoch_done: Called after the epoch's record: the position is the next epoch's start.
    """
    totals = trainer.totals.clone()
    trainer.comm.allreduce_sum_([totals])  # the whole epoch so far; rank 0 resumes with it
    callbacks = callback_states(trainer.callbacks)
    rng = rng_state()
    return {
        "format": FORMAT, "version": VERSION,
        "identity": dict(trainer.checkpoint.identity) if trainer.checkpoint else {},
        "step": trainer.step,
        "epoch": trainer.epoch + 1 if epoch_done else trainer.epoch,
        "batch": 0 if epoch_done else trainer.batch,
        "world_size": trainer.comm.world_size,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "callbacks": callbacks,
        "rng": rng,
        "epoch_totals": torch.zeros(3, dtype=torch.float64) if epoch_done else totals,
        "batch_times": [] if epoch_done else list(trainer.stats.batch_times),
        "history": json.loads(json.dumps(trainer.history)),
        "test_records": json.loads(json.dumps(trainer.test_records)),
        "train_time": trainer.train_time(),
        "wall_time": trainer.wall.elapsed(),
        # fp16's loss scale and its growth tracker: a resumed run scales as this one would.
        "grad_scaler": scaler.state_dict() if (scaler := getattr(trainer, "grad_scaler", None)) else None,
    }


def load_trainer_state(trainer: Any, state: Mapping[str, Any]) -> None:
    """Continues from ``trainer_state()``: weights, optimizer, callbacks, RNGs, position, metrics.

    The optimizer's hyperparameters stay those of this run's config (a resumed run may
    change the learning rate); its state comes from the checkpoint.
    """
    trainer.model.load_state_dict(state["model"])
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    trainer.optimizer.load_state_dict(state["optimizer"])
    for group, hyper in zip(trainer.optimizer.param_groups, fresh, strict=True):
        group.update(hyper)
    load_callback_states(trainer.callbacks, state["callbacks"])
    set_rng_state(state["rng"])
    trainer.step, trainer.epoch, trainer.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])
    # The saved totals are the sum over the old ranks: rank 0 carries them, the others start at 0.
    trainer.totals = (state["epoch_totals"].clone().cpu() if trainer.comm.rank == 0
                      else torch.zeros(3, dtype=torch.float64))
    trainer.stats.batch_times = list(state["batch_times"])
    trainer.history = list(state["history"])
    trainer.test_records = list(state.get("test_records", []))  # absent from older checkpoints
    trainer.clock.total = float(state.get("train_time", 0.0))
    # Older checkpoints kept no wall_time: the training time is the closest they hold.
    trainer.wall.resume_at(float(state.get("wall_time", state.get("train_time", 0.0))))
    scaler = getattr(trainer, "grad_scaler", None)
    if scaler is not None and state.get("grad_scaler"):  # absent from older and fp32/bf16 checkpoints
        scaler.load_state_dict(state["grad_scaler"])
