"""The one training loop. Reads top to bottom; callbacks hook in at LBANN's named points.

Each rank runs this loop on its share of every global mini-batch (the shares may differ by a
sample, or be empty). The loss is the mean over the rank's local samples; gradients are
combined over ranks right after backward, each rank's weighted by its share of the batch, so
every rank steps with the gradient one rank would compute on the whole batch and keeps the
same weights (docs/algorithm.md §6).

With ``accumulate_steps`` k a rank's share of a step runs forward and backward in k
micro-batches (``trainer/forward_backward.py``, docs/algorithm.md §3); ``precision`` runs forward
and loss under autocast (bf16, fp16 with a loss scaler; ``trainer/precision.py``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kfac_callback.base import Callback
from trainer.checkpoint import CheckpointPolicy
from trainer.clock import TrainClock, WallClock
from trainer.data.mnist import batch_plan, epoch_batches
from trainer.evaluate import Evaluator
from trainer.faults import nonfinite_step, skip_overflow, stop_on_signal, write_checkpoint
from trainer.forward_backward import forward_backward
from trainer.gradients import (
    average_gradients,
    nonfinite_gradients,
)
from trainer.observe import lbann_log
from trainer.observe.metrics import Stats, append_metrics, epoch_record, periodic_test_record, rewrite_metrics
from trainer.precision import make_precision
from trainer.ranks.signals import StopSignals
from trainer.state import load_trainer_state, trainer_state
from trainer.stop_targets import StopTargets
from trainer.tasks import Task, make_task


class Trainer:
    """Trains ``model`` on in-memory tensors with data-parallel ranks and LBANN's hooks.

    Args:
        model: the network, already on ``device``.
        optimizer: the base optimizer over the model's parameters.
        data: an object with ``train_x, train_y, test_x, test_y`` tensors (all samples; each
            rank picks its share of every global mini-batch).
        epochs: training epochs.
        mini_batch_size: the GLOBAL mini-batch size, any size on any number of ranks
            (``trainer.data.mnist.split_batch`` says each rank's share).
        callbacks: called in this order at every hook.
        comm: the communicator (``trainer.ranks.distributed``).
        device: where the model lives.
        seed: drives the per-epoch shuffle.
        test_every_epoch: also evaluate the test set after every epoch, not only at the end.
        test_every_steps: also evaluate it every this many (global) steps (0: off); each
            evaluation while training then appends a ``"kind": "test"`` record to the metrics.
        stop_at_test_accuracy: end the run once a test reaches this accuracy in % (None: never).
        full_train_objective: every test record (``test_every_steps``) also holds the objective and
            accuracy on the whole training set, evaluated like the test set (eval mode, in order).
        stop_at_train_objective: end the run once that full-train objective is <= this (None: never).
        max_train_seconds: end the run, with a periodic test, at the first step after which any rank
            has trained this many seconds (None: never): every method of a benchmark gets one budget.
        metrics_path: where one JSON line per epoch (and per test, see above) goes (None: nowhere).
        log: prints a line (on rank 0).
        checkpoint: when and where to write checkpoints (None: never; also no stop on signals).
        on_nonfinite: ``skip`` a step whose loss or gradients hold NaN/Inf, or ``stop`` with a
            checkpoint of the state before it.
        accumulate_steps: k micro-batches (forward and backward passes) per optimizer step.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 with a GradScaler, GPUs only).
        lr_schedule: ``(step, total_steps) -> learning rate``, set on every param group before each
            step's hooks (``trainer.lr_schedule``; None: the optimizer's rate stays as built).
        task: targets, loss and metric (``trainer.tasks``; None: classification).
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
        full_train_objective: bool = False,
        stop_at_train_objective: Optional[float] = None,
        metrics_path: Optional[str] = None,
        log: Callable[[str], None] = print,
        checkpoint: Optional[CheckpointPolicy] = None,
        on_nonfinite: str = "skip",
        accumulate_steps: int = 1,
        precision: str = "fp32",
        lr_schedule: Optional[Callable[[int, int], float]] = None,
        task: Optional[Task] = None,
        max_train_seconds: Optional[float] = None,
    ) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.task = task or make_task("classification")
        self.epochs, self.mini_batch_size = epochs, mini_batch_size
        self.callbacks = list(callbacks)
        self.comm, self.device, self.seed = comm, device, seed
        self.test_every_epoch, self.test_every_steps = test_every_epoch, test_every_steps
        self.metrics_path, self.log = metrics_path, log
        self.checkpoint, self.on_nonfinite = checkpoint, on_nonfinite
        if accumulate_steps < 1:
            raise ValueError(f"trainer.accumulate_steps: must be >= 1, got {accumulate_steps}")
        self.accumulate_steps = accumulate_steps  # read by the K-FAC callback at on_setup_end
        self.precision = make_precision(precision, device)
        self.grad_scaler = self.precision.scaler  # fp16's; read by the K-FAC callback too
        self.overflows = 0  # fp16 steps the scaler skipped
        self.lr_schedule = lr_schedule
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
        self.full_train_objective = full_train_objective
        self.stop_targets = StopTargets(stop_at_test_accuracy, stop_at_train_objective, max_train_seconds)
        self.evaluator = Evaluator(model, data, mini_batch_size, seed, comm, device, self.task)
        self.clock = TrainClock()  # training seconds, tests left out
        self.loss: Optional[torch.Tensor] = None
        self.plan = batch_plan(len(self.data.train_y), self.mini_batch_size, self.comm.world_size)
        self.shares: Optional[tuple[int, ...]] = None  # per rank, its samples of the current step
        self.logits: Optional[torch.Tensor] = None  # the step's logits, before its backward (accumulate_steps=1)
        self.inputs: Optional[torch.Tensor] = None  # and its inputs and targets (K-FAC's adaptive rules)
        self.targets: Optional[torch.Tensor] = None
        self.shape = lbann_log.epoch_shape(self.plan, batch_plan(len(data.test_y), mini_batch_size, comm.world_size),
                                           mini_batch_size, comm.world_size)
        self.wall = WallClock()  # the records' wall_time (a resumed run continues its checkpoint's)
        self._dispatch("on_setup_end")

    reached = property(lambda self: self.stop_targets.reached, doc="The accuracy that met stop_at_test_accuracy.")
    reached_objective = property(lambda self: self.stop_targets.reached_objective, doc="The objective that met its target.")

    def _dispatch(self, hook: str) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self)

    def fit(self) -> list[dict[str, Any]]:
        """Trains up to ``epochs`` epochs (from where a loaded state left off), tests at the end.

        A test that meets a target (``trainer.stop_targets``) ends the run there as if that epoch
        were the last: its (partial) epoch record, the final test lines and checkpoint, ``reached``
        (or ``reached_objective``) set.

        Returns:
            The per-epoch records (those of a loaded checkpoint first). On SIGTERM/SIGUSR1 it
            returns early with a checkpoint written and ``stopped`` set.
        """
        self._dispatch("on_train_begin")
        first = self.epoch
        self.clock.start()
        cut_short = False
        # Without a place for checkpoints a signal keeps its usual meaning (it ends the process).
        with self.signals.installed() if self.checkpoint else contextlib.nullcontext():
            for epoch in range(first, self.epochs):
                self.epoch = epoch
                if not self.train_epoch():
                    self.clock.stop()
                    return self.history
                # The test accuracy is a sum over all ranks: every rank takes the same decision.
                last = self.epoch == self.epochs - 1 or self.target_met()
                if last:
                    self._dispatch("on_train_end")
                if last or self.test_every_epoch:
                    self.test()  # after a periodic test at this very step: its result, not a second pass
                if not last and self.target_met():
                    last = True
                    self._dispatch("on_train_end")
                self._record()
                if self.checkpoint and (last or self.checkpoint.every_epoch):
                    self.save(epoch_done=True)
                cut_short = self.target_met() and (epoch < self.epochs - 1 or self.batch < self.shape.train_iters)
                self.batch = 0
                if last:
                    break
        self.clock.stop()
        if cut_short:
            for line in self.stop_targets.end_lines(self.step, self.epoch, self.train_time()):
                self.log(line)
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
        batches = epoch_batches(len(self.data.train_y), self.mini_batch_size, self.epoch, self.seed, self.comm.rank,
                                self.comm.world_size, shuffle=True)
        # The order is a pure function of (seed, epoch): a resumed epoch skips what was done.
        for index in itertools.islice(batches, self.batch, None):
            self.shares = self.plan.step_shares(self.batch)  # read by callbacks (K-FAC) from here on
            self._set_learning_rate()  # before every hook of the step: K-FAC reads it after backward
            self._dispatch("on_batch_begin")
            x = self.data.train_x[index].to(self.device, non_blocking=True)
            y = self.data.train_y[index].to(self.device, non_blocking=True)
            correct = self._forward_backward(x, y)
            stop, bad_loss = average_gradients(self.model, self.comm, self.checkpoint is not None and
                                               self.signals.received is not None, not bool(torch.isfinite(self.loss)),
                                               self.shares)
            scaler = self.grad_scaler
            if scaler is not None:
                scaler.unscale_(self.optimizer)  # K-FAC and the checks see the true gradients
            bad = nonfinite_gradients(self.model)
            if scaler is not None and bad and not bad_loss:
                self.overflows += 1  # an fp16 overflow: the scaler skips the step, lowers its scale
                skip_overflow(scaler, self.optimizer, self.step, self.overflows == 1, self.log)
            elif bad_loss or bad:
                nonfinite_step(bad_loss, bad, x, self._where(), self.optimizer, self.on_nonfinite,  # raises for stop
                               self.save if self.checkpoint else None, self.log)
            else:
                self._dispatch("on_backward_prop_end")
                self._dispatch("on_optimize_begin")
                if scaler is None:
                    self.optimizer.step()
                else:
                    scaler.step(self.optimizer)
                    scaler.update()
                self._dispatch("on_optimize_end")
                n = len(y)
                self.totals += torch.tensor([self.loss.item() * n, correct, n], dtype=torch.float64)
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
                if self.target_met():
                    break  # the epoch ends here; fit() makes it the last
            elif self.stop_targets.budget_spent(self.train_time, self.comm):
                self.periodic_test()  # the run's last point, at the step the budget ran out
                break
        totals = self.totals.clone()
        self.comm.allreduce_sum_([totals])
        self.stats.train_loss = (totals[0] / totals[2]).item()
        self.stats.train_accuracy = self.task.metric(float(totals[1]), float(totals[2]))
        self._dispatch("on_epoch_end")
        return True

    def _set_learning_rate(self) -> None:
        """Sets this step's rate on every param group: a function of the step alone, so a resumed
        run (its step from the checkpoint) goes on exactly as the uninterrupted one."""
        if self.lr_schedule is None:
            return
        lr = self.lr_schedule(self.step, self.epochs * self.shape.train_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def learning_rate(self) -> float:
        """The rate of the latest step (of the next one before any step), as the records carry it."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward and backward of this rank's share (``trainer.forward_backward``); sets
        ``self.loss`` (the share's mean, with the L2 term) and, with one micro-batch, the step's
        ``logits``, ``inputs`` and ``targets``, then runs ``on_forward_prop_end`` before the last
        backward. Returns the share's metric sum."""
        self.optimizer.zero_grad(set_to_none=True)

        def forward_end(loss: torch.Tensor, logits: Any, inputs: Any, targets: Any) -> None:
            self.loss = loss
            if self.accumulate_steps == 1:
                self.logits, self.inputs, self.targets = logits, inputs, targets
            self._dispatch("on_forward_prop_end")

        return forward_backward(self.model, self.task, self.precision, x, y, self.accumulate_steps, forward_end)

    # -- stopping, faults and checkpoints (``trainer.faults``) ------------------------------

    def _where(self) -> str:
        return f"step {self.step} (epoch {self.epoch}, batch {self.batch})"

    def _stop(self) -> None:
        """Checkpoints on every rank's agreed step and leaves the ``preempted`` marker."""
        self.stopped = stop_on_signal(self.save(), self.signals.received, self.comm, self.checkpoint.work_dir,
                                      self._where(), self.log)

    def save(self, epoch_done: bool = False) -> Optional[Path]:
        """Writes a checkpoint (rank 0; every rank must call it, K-FAC gathers its inverses).

        Returns:
            The path (on rank 0), or the last good checkpoint if the weights are not finite.

        Raises:
            NonFiniteError: The weights hold NaN/Inf: nothing is written, the run stops.
        """
        state = self.state_dict(epoch_done)
        path = write_checkpoint(state, self.model, self.comm.rank, self.step, self.checkpoint, self.last_checkpoint)
        self.last_checkpoint = path or self.last_checkpoint  # None on every rank but 0
        return path

    def state_dict(self, epoch_done: bool = False) -> dict[str, Any]:
        """The checkpoint's content (``trainer.state.trainer_state``; a collective with several ranks)."""
        return trainer_state(self, epoch_done)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state_dict()`` (``trainer.state.load_trainer_state``); the metrics file
        then says what the checkpoint says (records written after it are dropped)."""
        load_trainer_state(self, state)
        if self.metrics_path and self.comm.rank == 0:
            rewrite_metrics(self.metrics_path, self.history, self.test_records)

    # -- testing and the training clock ----------------------------------------------------

    def train_time(self) -> float:
        """Seconds of training so far on this rank's clock: ``fit()`` less every test evaluation
        (rank 0's goes into the records; a resumed run continues from its checkpoint's)."""
        return self.clock.elapsed()

    def test(self) -> None:
        """Evaluates the test set with its hooks (LBANN's test lines); the training clock stops meanwhile."""
        with self.clock.paused():
            self.model.eval()
            self._dispatch("on_test_begin")
            self.stats.test_loss, self.stats.test_accuracy = self.evaluate()
            self._dispatch("on_test_end")
            self.model.train()
            self._after_test()

    def periodic_test(self) -> None:
        """The test of ``test_every_steps``: no hooks (the epoch's record and lines stay as they were),
        one progress line and one ``"kind": "test"`` record; the training clock stops meanwhile."""
        with self.clock.paused():
            loss, accuracy = self.evaluate()
            full = ""
            if self.full_train_objective:
                train_loss, train_accuracy = self.evaluate_train()
                full = f", full training objective {train_loss:.6g} ({self.task.metric_text(train_accuracy)})"
            self.log(f"trainer: step {self.step} (epoch {self.epoch}): test {self.task.metric_text(accuracy)}, "
                     f"objective {loss:.6g}{full}, {self.train_time():.1f}s of training")
            self._after_test()

    def _after_test(self) -> None:
        """Writes the test record (with ``test_every_steps``) and checks the targets."""
        step, loss, accuracy = self.evaluator.last_test
        if self.test_every_steps and not (self.test_records and self.test_records[-1]["step"] == step):
            record = periodic_test_record(step, self.epoch, self.epoch + self.batch / max(1, self.shape.train_iters),
                                          self.train_time(), self.wall.elapsed(), loss, accuracy,
                                          self.task.metric_key)
            if self.full_train_objective:
                train_loss, train_accuracy = self.evaluate_train()  # the periodic test's pass, or the final test's
                record.update({"train_objective_full": train_loss, f"train_{self.task.metric_key}_full": train_accuracy})
                self.stop_targets.check_train_objective(train_loss)
            self.test_records.append(record)
            if self.metrics_path and self.comm.rank == 0:
                append_metrics(self.metrics_path, record)
        self.stop_targets.check_test(accuracy, self.train_time(), self.comm)

    def evaluate(self) -> tuple[float, float]:
        """(Objective, accuracy in %) on the test set (``Evaluator.test_set``: cached per step)."""
        return self.evaluator.test_set(self.step)

    def evaluate_train(self) -> tuple[float, float]:
        """The same on the whole training set (``Evaluator.train_set``)."""
        return self.evaluator.train_set(self.step)

    def target_met(self) -> bool:
        """Whether a test met a target (``trainer.stop_targets``; the same on every rank)."""
        return self.stop_targets.met()

    def _record(self) -> None:
        record = epoch_record(self.epoch, self.step, self.stats, self.task.metric_key, self.learning_rate(),
                              self.wall.elapsed(), self.callbacks, self.train_time())
        self.history.append(record)
        if self.metrics_path and self.comm.rank == 0:
            append_metrics(self.metrics_path, record)
