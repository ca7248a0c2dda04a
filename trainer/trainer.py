"""The one training loop. Reads top to bottom; callbacks hook in at LBANN's named points.

Each rank runs this loop on its share of every global mini-batch. The loss is the mean over
the rank's local samples; gradients are averaged over ranks right after backward, so every
rank steps with the same gradient and keeps the same weights.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kfac_callback.base import Callback
from launcher.batch import PREEMPTED_FILE
from trainer import lbann_log
from trainer.checkpoint import FORMAT, VERSION, StopSignals, nonfinite_names, nonfinite_parameters, save_checkpoint
from trainer.data import batch_plan, epoch_batches

ON_NONFINITE = ("skip", "stop")


class NonFiniteError(RuntimeError):
    """Training stopped on NaN/Inf (``on_nonfinite=stop``); the message is one line with the step."""


@dataclass(frozen=True)
class CheckpointPolicy:
    """When and where the trainer writes checkpoints (``every_steps=0``: not by step count).

    Attributes:
        directory: The run's checkpoint folder.
        every_steps: Write every this many steps (0: off).
        every_epoch: Also write at every epoch end.
        keep: Keep the newest this many.
        identity: ``checkpoint.run_identity`` of the run, stored in every checkpoint.
        work_dir: Where the ``preempted`` marker goes (``None``: nowhere).
    """

    directory: str
    every_steps: int = 0
    every_epoch: bool = False
    keep: int = 3
    identity: Mapping[str, Any] = field(default_factory=dict)
    work_dir: Optional[str] = None


@dataclass
class Stats:
    """What the current epoch and the last test measured (read by the callbacks)."""

    train_loss: float = float("nan")
    train_accuracy: float = float("nan")
    epoch_time: float = 0.0
    epoch_start: float = 0.0
    batch_times: list[float] = field(default_factory=list)
    test_loss: Optional[float] = None
    test_accuracy: Optional[float] = None


class Trainer:
    """Trains ``model`` on in-memory tensors with data-parallel ranks and LBANN's hooks.

    Args:
        model: the network, already on ``device``.
        optimizer: the base optimizer over the model's parameters.
        data: an object with ``train_x, train_y, test_x, test_y`` tensors (all samples; each
            rank picks its share of every global mini-batch).
        epochs: training epochs.
        mini_batch_size: the GLOBAL mini-batch size.
        callbacks: called in this order at every hook.
        comm: the communicator (``trainer.distributed``).
        device: where the model lives.
        seed: drives the per-epoch shuffle.
        test_every_epoch: also evaluate the test set after every epoch, not only at the end.
        test_every_steps: also evaluate it every this many (global) steps (0: off); each
            evaluation while training then appends a ``"kind": "test"`` record to the metrics.
        stop_at_test_accuracy: end the run once a test reaches this accuracy in % (None: never).
        metrics_path: where one JSON line per epoch (and per test, see above) goes (None: nowhere).
        log: prints a line (on rank 0).
        checkpoint: when and where to write checkpoints (None: never; also no stop on signals).
        on_nonfinite: ``skip`` a step whose loss or gradients hold NaN/Inf, or ``stop`` with a
            checkpoint of the state before it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Any,
        *,
        epochs: int,
        mini_batch_size: int,
        callbacks: Sequence[Callback],
        comm: Any,
        device: torch.device,
        seed: int,
        test_every_epoch: bool = False,
        test_every_steps: int = 0,
        stop_at_test_accuracy: Optional[float] = None,
        metrics_path: Optional[str] = None,
        log: Callable[[str], None] = print,
        checkpoint: Optional[CheckpointPolicy] = None,
        on_nonfinite: str = "skip",
    ) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.epochs, self.mini_batch_size = epochs, mini_batch_size
        self.callbacks = list(callbacks)
        self.comm, self.device, self.seed = comm, device, seed
        self.test_every_epoch = test_every_epoch
        self.test_every_steps, self.stop_at_test_accuracy = test_every_steps, stop_at_test_accuracy
        self.metrics_path = metrics_path
        self.log = log
        self.checkpoint, self.on_nonfinite = checkpoint, on_nonfinite
        self.epoch = 0
        self.step = 0
        self.batch = 0  # batches of the current epoch already done (a resumed run skips them)
        self.totals = torch.zeros(3, dtype=torch.float64)  # this epoch: loss sum, correct, samples
        self.signals = StopSignals()
        self.stopped: Optional[str] = None  # why fit() ended early (a signal), if it did
        self.last_checkpoint: Optional[Path] = None
        self.stats = Stats()
        self.history: list[dict[str, Any]] = []
        self.test_records: list[dict[str, Any]] = []  # "kind": "test" records (test_every_steps > 0)
        self.reached: Optional[float] = None  # the test accuracy that met stop_at_test_accuracy
        self._eval: Optional[tuple[int, float, float]] = None  # (step, loss, accuracy) of the last test
        self._train_time = 0.0  # training seconds before the clock last stopped
        self._clock: Optional[float] = None  # perf_counter() when the clock last started (None: stopped)
        self.loss: Optional[torch.Tensor] = None
        self.shape = self._epoch_shape()
        self._start = time.time()
        self._dispatch("on_setup_end")

    def _epoch_shape(self) -> lbann_log.EpochShape:
        train = batch_plan(len(self.data.train_y), self.mini_batch_size, self.comm.world_size)
        test = batch_plan(len(self.data.test_y), self.mini_batch_size, self.comm.world_size)
        return lbann_log.EpochShape(
            train_iters=train.iterations, test_iters=test.iterations, global_mb=self.mini_batch_size,
            global_last_train=train.global_last_batch, global_last_test=test.global_last_batch,
            world_size=self.comm.world_size)

    def _dispatch(self, hook: str) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self)

    def fit(self) -> list[dict[str, Any]]:
        """Trains up to ``epochs`` epochs (from where a loaded state left off), tests at the end.

        A test that reaches ``stop_at_test_accuracy`` ends the run there as if that epoch were
        the last: its (partial) epoch record, the final test lines and checkpoint, ``reached`` set.

        Returns:
            The per-epoch records (those of a loaded checkpoint first). On SIGTERM/SIGUSR1 it
            returns early with a checkpoint written and ``stopped`` set.
        """
        self._dispatch("on_train_begin")
        first = self.epoch
        self._start_clock()
        cut_short = False
        # Without a place for checkpoints a signal keeps its usual meaning (it ends the process).
        with self.signals.installed() if self.checkpoint else contextlib.nullcontext():
            for epoch in range(first, self.epochs):
                self.epoch = epoch
                if not self.train_epoch():
                    self._stop_clock()
                    return self.history
                # The test accuracy is a sum over all ranks: every rank takes the same decision.
                last = self.epoch == self.epochs - 1 or self.reached is not None
                if last:
                    self._dispatch("on_train_end")
                if last or self.test_every_epoch:
                    self.test()  # after a periodic test at this very step: its result, not a second pass
                if not last and self.reached is not None:
                    last = True
                    self._dispatch("on_train_end")
                self._record()
                if self.checkpoint and (last or self.checkpoint.every_epoch):
                    self.save(epoch_done=True)
                cut_short = self.reached is not None and (epoch < self.epochs - 1 or self.batch < self.shape.train_iters)
                self.batch = 0
                if last:
                    break
        self._stop_clock()
        if cut_short:
            self.log(f"trainer: test accuracy {self.reached:.2f}% >= trainer.stop_at_test_accuracy="
                     f"{self.stop_at_test_accuracy:g} at step {self.step} (epoch {self.epoch}) after "
                     f"{self.train_time():.1f}s of training; run stopped")
        if self.epochs == 0:
            self._dispatch("on_train_end")
            self.test()
        elif first >= self.epochs:
            self.log(f"nothing to train: the checkpoint is at epoch {first}, trainer.epochs is {self.epochs}")
        return self.history

    def train_epoch(self) -> bool:
        """One pass over the training set, each rank on its share of every global batch.

        Returns:
            ``False`` when a stop signal ended the epoch early (after a checkpoint).
        """
        self.model.train()
        self.stats.test_loss = self.stats.test_accuracy = None
        resumed_times = self.stats.batch_times if self.batch else []
        self._dispatch("on_epoch_begin")
        self.stats.batch_times = resumed_times + self.stats.batch_times
        if not self.batch:
            self.totals = torch.zeros(3, dtype=torch.float64)
        batches = epoch_batches(
            len(self.data.train_y),
            self.mini_batch_size,
            self.epoch,
            self.seed,
            self.comm.rank,
            self.comm.world_size,
            shuffle=True,
        )
        # The order is a pure function of (seed, epoch): a resumed epoch skips what was done.
        for index in itertools.islice(batches, self.batch, None):
            self._dispatch("on_batch_begin")
            x = self.data.train_x[index].to(self.device, non_blocking=True)
            y = self.data.train_y[index].to(self.device, non_blocking=True)
            logits = self.model(x)
            self.loss = F.cross_entropy(logits, y)
            self._dispatch("on_forward_prop_end")
            self.optimizer.zero_grad(set_to_none=True)
            self.loss.backward()
            stop, bad_loss = self.average_gradients(not bool(torch.isfinite(self.loss)))
            bad = self._nonfinite_gradients()
            if bad_loss or bad:
                self._nonfinite(bad_loss, bad, x)  # raises for on_nonfinite=stop
            else:
                self._dispatch("on_backward_prop_end")
                self._dispatch("on_optimize_begin")
                self.optimizer.step()
                self._dispatch("on_optimize_end")
                with torch.no_grad():
                    n = len(y)
                    self.totals += torch.tensor(
                        [self.loss.item() * n, (logits.argmax(1) == y).sum().item(), n], dtype=torch.float64
                    )
            self.step += 1
            self.batch += 1
            self._dispatch("on_batch_end")
            if stop:
                self._stop()
                return False
            if self.checkpoint and self.checkpoint.every_steps and self.step % self.checkpoint.every_steps == 0:
                self.save()
            if self.test_every_steps and self.step % self.test_every_steps == 0:
                self.periodic_test()
                if self.reached is not None:
                    break  # the epoch ends here; fit() makes it the last
        totals = self.totals.clone()
        self.comm.allreduce_sum_([totals])
        self.stats.train_loss = (totals[0] / totals[2]).item()
        self.stats.train_accuracy = (100.0 * totals[1] / totals[2]).item()
        self._dispatch("on_epoch_end")
        return True

    # -- stopping, faults and checkpoints -------------------------------------------------

    def _nonfinite_gradients(self) -> list[str]:
        """Parameters whose (rank-averaged, so identical everywhere) gradient holds NaN/Inf."""
        return nonfinite_names((n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None)

    def _nonfinite(self, bad_loss: bool, bad: list[str], x: torch.Tensor) -> None:
        """Reports a NaN/Inf step, then skips it (no optimizer step) or stops with a checkpoint."""
        what = []
        if bad_loss:
            inputs = "" if bool(torch.isfinite(x).all()) else " (this rank's batch holds non-finite inputs)"
            what.append(f"non-finite loss{inputs}")
        if bad:
            what.append("non-finite gradient in " + ", ".join(bad))
        where = f"step {self.step} (epoch {self.epoch}, batch {self.batch})"
        self.optimizer.zero_grad(set_to_none=True)
        if self.on_nonfinite == "skip":
            self.log(f"trainer: {where}: {'; '.join(what)}; step skipped")
            return
        saved = ""
        if self.checkpoint:
            # The weights are still those before this step: resuming retries (or, with
            # trainer.on_nonfinite=skip, skips) this very batch.
            saved = f"; checkpoint {self.save() or 'written by rank 0'}"
        raise NonFiniteError(f"{where}: {'; '.join(what)}; stopped (trainer.on_nonfinite=stop){saved}")

    def _stop(self) -> None:
        """Checkpoints on every rank's agreed step and leaves the ``preempted`` marker."""
        path = self.save()
        self.stopped = self.signals.received or "a signal to another rank"
        if self.comm.rank == 0 and self.checkpoint.work_dir:
            Path(self.checkpoint.work_dir, PREEMPTED_FILE).write_text(f"{path}\n")
        self.comm.barrier()  # no rank leaves before rank 0's checkpoint is on disk
        self.log(f"trainer: stopped by {self.stopped} at step {self.step} (epoch {self.epoch}, batch "
                 f"{self.batch}); checkpoint {path}; resume with trainer.resume={self.checkpoint.work_dir or path}")

    def save(self, epoch_done: bool = False) -> Optional[Path]:
        """Writes a checkpoint (rank 0; every rank must call it, K-FAC gathers its inverses).

        Returns:
            The path (on rank 0), or the last good checkpoint if the weights are not finite.

        Raises:
            NonFiniteError: The weights hold NaN/Inf: nothing is written, the run stops.
        """
        state = self.state_dict(epoch_done)
        if self.comm.rank != 0:
            return None
        bad = nonfinite_parameters(self.model)
        if bad:
            raise NonFiniteError(f"step {self.step}: weights of {', '.join(bad)} are not finite; no checkpoint "
                                 f"written (the last good one is {self.last_checkpoint})")
        self.last_checkpoint = save_checkpoint(state, self.checkpoint.directory, self.step, self.checkpoint.keep)
        return self.last_checkpoint

    def state_dict(self, epoch_done: bool = False) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit (a collective with several ranks).

        Args:
            epoch_done: Called after the epoch's record: the position is the next epoch's start.
        """
        totals = self.totals.clone()
        self.comm.allreduce_sum_([totals])  # the whole epoch so far; rank 0 resumes with it
        callbacks = self._callback_states()
        np_state = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
               "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])]}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": FORMAT, "version": VERSION,
            "identity": dict(self.checkpoint.identity) if self.checkpoint else {},
            "step": self.step,
            "epoch": self.epoch + 1 if epoch_done else self.epoch,
            "batch": 0 if epoch_done else self.batch,
            "world_size": self.comm.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "callbacks": callbacks,
            "rng": rng,
            "epoch_totals": torch.zeros(3, dtype=torch.float64) if epoch_done else totals,
            "batch_times": [] if epoch_done else list(self.stats.batch_times),
            "history": json.loads(json.dumps(self.history)),
            "test_records": json.loads(json.dumps(self.test_records)),
            "train_time": self.train_time(),
        }

    def _callback_states(self) -> dict[str, dict[str, Any]]:
        """Every callback's non-empty ``state_dict()`` under its ``state_key`` (collectives on every rank).

        Raises:
            ValueError: If two callbacks with state share a key (one would overwrite the other).
        """
        states: dict[str, dict[str, Any]] = {}
        for cb in self.callbacks:
            state = cb.state_dict()
            if not state:
                continue
            if cb.state_key in states:
                raise ValueError(f"two callbacks save their state under {cb.state_key!r}: give one "
                                 "of them its own state_key")
            states[cb.state_key] = state
        return states

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state_dict()``: weights, optimizer, callbacks, RNGs, position, metrics.

        The optimizer's hyperparameters stay those of this run's config (a resumed run may
        change the learning rate); its state comes from the checkpoint.
        """
        self.model.load_state_dict(state["model"])
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, hyper in zip(self.optimizer.param_groups, fresh, strict=True):
            group.update(hyper)
        for cb in self.callbacks:
            if cb.state_key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.state_key])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(rng["python"]))
        pos, has_gauss, cached = rng["numpy_rest"]
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])
        # The saved totals are the sum over the old ranks: rank 0 carries them, the others start at 0.
        self.totals = state["epoch_totals"].clone().cpu() if self.comm.rank == 0 else torch.zeros(3, dtype=torch.float64)
        self.stats.batch_times = list(state["batch_times"])
        self.history = list(state["history"])
        self.test_records = list(state.get("test_records", []))  # absent from older checkpoints
        self._train_time = float(state.get("train_time", 0.0))
        if self.metrics_path and self.comm.rank == 0:
            # The metrics file says what the checkpoint says: records written after it are dropped.
            tmp = f"{self.metrics_path}.tmp"
            os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
            # In the order they were written: a test at an epoch's last step precedes its record.
            records = sorted(self.history + self.test_records, key=lambda r: (r["step"], r.get("kind") != "test"))
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
            os.replace(tmp, self.metrics_path)

    def average_gradients(self, loss_bad: bool = False) -> tuple[bool, bool]:
        """Averages the gradients over ranks, and agrees on two flags, in ONE collective.

        A signal may reach one rank only, and each rank sees only its own loss: the flags ride
        in the gradients' buffer, so every rank takes the same decision at the same step
        without a second collective (momentum SGD, 4 ranks on 2 cores: 47.7 → 38.7 ms per step).

        Args:
            loss_bad: this rank's loss is not finite.

        Returns:
            (a stop was requested on some rank, some rank's loss is not finite).
        """
        stop = self.checkpoint is not None and self.signals.received is not None
        if self.comm.world_size == 1:
            return stop, loss_bad
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        like = grads[0] if grads else next(self.model.parameters())
        flags = torch.tensor([float(stop), float(loss_bad)], dtype=like.dtype, device=like.device)
        self.comm.allreduce_sum_([*grads, flags])  # packed into one buffer by the communicator
        for g in grads:
            g /= self.comm.world_size
        stop_any, bad_any = (flags > 0).tolist()
        return stop_any, bad_any

    # -- testing and the training clock ----------------------------------------------------

    def train_time(self) -> float:
        """Seconds of training so far on this rank's clock: ``fit()`` less every test evaluation.

        Rank 0's value goes into the records; a resumed run continues from its checkpoint's.
        """
        running = time.perf_counter() - self._clock if self._clock is not None else 0.0
        return self._train_time + running

    def _start_clock(self) -> None:
        if self._clock is None:
            self._clock = time.perf_counter()

    def _stop_clock(self) -> bool:
        """Stops the training clock; returns whether it was running."""
        if self._clock is None:
            return False
        self._train_time += time.perf_counter() - self._clock
        self._clock = None
        return True

    def test(self) -> None:
        """Evaluates the test set with its hooks (LBANN's test lines); the training clock stops meanwhile."""
        running = self._stop_clock()
        self.model.eval()
        self._dispatch("on_test_begin")
        self.stats.test_loss, self.stats.test_accuracy = self.evaluate()
        self._dispatch("on_test_end")
        self.model.train()
        self._after_test()
        if running:
            self._start_clock()

    def periodic_test(self) -> None:
        """The test of ``test_every_steps``: no hooks (the epoch's record and lines stay as they were),
        one progress line and one ``"kind": "test"`` record; the training clock stops meanwhile."""
        running = self._stop_clock()
        loss, accuracy = self.evaluate()
        self.log(f"trainer: step {self.step} (epoch {self.epoch}): test accuracy {accuracy:.2f}%, "
                 f"objective {loss:.6g}, {self.train_time():.1f}s of training")
        self._after_test()
        if running:
            self._start_clock()

    def _after_test(self) -> None:
        """Writes the test record (with ``test_every_steps``) and checks the target accuracy."""
        step, loss, accuracy = self._eval
        if self.test_every_steps and not (self.test_records and self.test_records[-1]["step"] == step):
            record = {
                "kind": "test", "step": step, "epoch": self.epoch,
                "epochs_done": self.epoch + self.batch / max(1, self.shape.train_iters),
                "train_time": self.train_time(), "wall_time": time.time() - self._start,
                "test_objective": loss, "test_accuracy": accuracy,
            }
            self.test_records.append(record)
            if self.metrics_path and self.comm.rank == 0:
                lbann_log.append_metrics(self.metrics_path, record)
        if self.stop_at_test_accuracy is not None and accuracy >= self.stop_at_test_accuracy:
            self.reached = accuracy

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(Objective, accuracy in %) on the (never shuffled) test set; every rank evaluates its share.

        The sums are all-reduced, so every rank gets the same numbers. A second call at the same
        step (an epoch-end test right after a periodic one) returns the first call's result.
        """
        if self._eval is not None and self._eval[0] == self.step:
            return self._eval[1], self._eval[2]
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        batches = epoch_batches(
            len(self.data.test_y),
            self.mini_batch_size,
            0,
            self.seed,
            self.comm.rank,
            self.comm.world_size,
            shuffle=False,
        )
        for index in batches:
            x = self.data.test_x[index].to(self.device, non_blocking=True)
            y = self.data.test_y[index].to(self.device, non_blocking=True)
            logits = self.model(x)
            totals += torch.tensor(
                [
                    F.cross_entropy(logits, y, reduction="sum").item(),
                    (logits.argmax(1) == y).sum().item(),
                    len(y),
                ],
                dtype=torch.float64,
            )
        self.comm.allreduce_sum_([totals])
        self.model.train(was_training)
        self._eval = (self.step, (totals[0] / totals[2]).item(), (100.0 * totals[1] / totals[2]).item())
        return self._eval[1], self._eval[2]

    def _record(self) -> None:
        mean, mx, mn, sd = lbann_log.batch_time_stats(self.stats.batch_times)
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "train_objective": self.stats.train_loss,
            "train_accuracy": self.stats.train_accuracy,
            "run_time": self.stats.epoch_time,
            "wall_time": time.time() - self._start,
            "minibatch_time": {"mean": mean, "max": mx, "min": mn, "stdev": sd},
        }
        if self.stats.test_accuracy is not None:
            record["test_objective"] = self.stats.test_loss
            record["test_accuracy"] = self.stats.test_accuracy
        for callback in self.callbacks:
            extra = getattr(callback, "metrics", None)
            if callable(extra):
                record.update(extra())
        self.history.append(record)
        if self.metrics_path and self.comm.rank == 0:
            lbann_log.append_metrics(self.metrics_path, record)


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` wants tuples; a loaded checkpoint may hand back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
