"""The one training loop. Reads top to bottom; callbacks hook in at LBANN's named points.

Each rank runs this loop on its share of every global mini-batch (the shares may differ by a
sample, or be empty). The loss is the mean over the rank's local samples; gradients are
combined over ranks right after backward, each rank's weighted by its share of the batch, so
every rank steps with the gradient one rank would compute on the whole batch and keeps the
same weights (docs/algorithm.md §6).

With ``accumulate_steps`` k a rank's share of a step is split into k micro-batches (as evenly
as it goes), each run forward and backward with its loss the sum over its samples divided by
the rank's n, so the k backward passes add up to the gradient of the rank's mean loss: the
gradient, and K-FAC's factors, of the whole share (docs/algorithm.md §3). ``precision`` runs
forward and loss under autocast (bf16, fp16 with a loss scaler; ``trainer/precision.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kfac_callback.base import Callback
from launcher.workdir import PREEMPTED_FILE, atomic_write_text
from trainer.checkpoint import CheckpointPolicy, save_checkpoint
from trainer.clock import TrainClock
from trainer.data.mnist import batch_plan, epoch_batches, split_batch
from trainer.evaluate import evaluate
from trainer.gradients import (
    NonFiniteError,
    average_gradients,
    describe_nonfinite,
    nonfinite_gradients,
    nonfinite_parameters,
)
from trainer.observe import lbann_log
from trainer.observe.metrics import append_metrics, rewrite_metrics
from trainer.precision import make_precision
from trainer.ranks.signals import StopSignals
from trainer.state import load_trainer_state, trainer_state
from trainer.tasks import Task, make_task


@dataclass
class Stats:
    """What the current epoch and the last test measured (read by the callbacks). The
    ``*_accuracy`` fields hold the task's metric (accuracy in %, or the reconstruction error)."""

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
        max_train_seconds: end the run at the first periodic test after this many seconds of
            training on any rank (None: never): every method of a benchmark gets the same budget.
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
        self.test_every_epoch = test_every_epoch
        self.test_every_steps, self.stop_at_test_accuracy = test_every_steps, stop_at_test_accuracy
        self.metrics_path = metrics_path
        self.log = log
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
        self.reached: Optional[float] = None  # the test accuracy that met stop_at_test_accuracy
        self.full_train_objective, self.stop_at_train_objective = full_train_objective, stop_at_train_objective
        self.reached_objective: Optional[float] = None  # the full-train objective that met stop_at_train_objective
        self.max_train_seconds = max_train_seconds
        self.out_of_time = False  # a periodic test found max_train_seconds spent
        self._eval: Optional[tuple[int, float, float]] = None  # (step, loss, accuracy) of the last test
        self._train_eval: Optional[tuple[int, float, float]] = None  # the same, of the last full-train pass
        self.clock = TrainClock()  # training seconds, tests left out
        self.loss: Optional[torch.Tensor] = None
        self.plan = batch_plan(len(self.data.train_y), self.mini_batch_size, self.comm.world_size)
        self.shares: Optional[tuple[int, ...]] = None  # per rank, its samples of the current step
        self.logits: Optional[torch.Tensor] = None  # the step's logits, before its backward (accumulate_steps=1)
        self.inputs: Optional[torch.Tensor] = None  # and its inputs and targets (K-FAC's adaptive rules)
        self.targets: Optional[torch.Tensor] = None
        self.shape = self._epoch_shape()
        self._start = time.time()
        self._dispatch("on_setup_end")

    def _epoch_shape(self) -> lbann_log.EpochShape:
        train, test = self.plan, batch_plan(len(self.data.test_y), self.mini_batch_size, self.comm.world_size)
        return lbann_log.EpochShape(
            train_iters=train.iterations, test_iters=test.iterations, global_mb=self.mini_batch_size,
            global_last_train=train.global_last_batch, global_last_test=test.global_last_batch,
            world_size=self.comm.world_size)

    def _dispatch(self, hook: str) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self)

    def fit(self) -> list[dict[str, Any]]:
        """Trains up to ``epochs`` epochs (from where a loaded state left off), tests at the end.

        A test that reaches ``stop_at_test_accuracy`` (or a full-train objective at or below
        ``stop_at_train_objective``) ends the run there as if that epoch were the last: its
        (partial) epoch record, the final test lines and checkpoint, ``reached`` (or
        ``reached_objective``) set.

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
        if cut_short and self.reached_objective is not None:
            self.log(f"trainer: full training objective {self.reached_objective:.6g} <= trainer.stop_at_train_objective="
                     f"{lbann_log.g(self.stop_at_train_objective)} at step {self.step} (epoch {self.epoch}) after "
                     f"{self.train_time():.1f}s of training; run stopped")
        if cut_short and self.out_of_time:
            self.log(f"trainer: {self.train_time():.1f}s of training >= trainer.max_train_seconds="
                     f"{lbann_log.g(self.max_train_seconds)} at step {self.step} (epoch {self.epoch}); run stopped")
        if cut_short and self.reached is not None:
            self.log(f"trainer: test accuracy {self.reached:.2f}% >= trainer.stop_at_test_accuracy="
                     f"{lbann_log.g(self.stop_at_test_accuracy)} at step {self.step} (epoch {self.epoch}) after "
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
                self._overflow(scaler)  # an fp16 overflow: the scaler skips the step, lowers its scale
            elif bad_loss or bad:
                self._nonfinite(bad_loss, bad, x)  # raises for on_nonfinite=stop
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

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Forward and backward of this rank's share, in ``accumulate_steps`` micro-batches.

        Sets ``self.loss`` (the mean over the share, with the task's L2 term) before the last
        backward, when ``on_forward_prop_end`` runs. Returns the share's metric sum (the task's:
        correct predictions, or squared errors).
        """
        n, k, task = len(y), self.accumulate_steps, self.task
        targets = task.targets(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        if k == 1:
            with self.precision.autocast():
                logits = self.model(x)
                # A rank without samples this step still runs forward and backward, so that it takes
                # part in every collective and every K-FAC hook fires; it contributes zero (the mean
                # of no samples would be NaN) (docs/algorithm.md §6).
                self.loss = task.loss_sum(logits, targets) / n + task.penalty(self.model) if n else logits.sum() * 0
            # Read by callbacks at on_forward_prop_end (K-FAC's fisher=mc and adaptive rules).
            self.logits, self.inputs, self.targets = logits, x, targets
            self._dispatch("on_forward_prop_end")
            self.precision.scale(self.loss).backward()
            return task.metric_sum(logits, targets)
        # k micro-batches, every rank the same number (empty ones too: every K-FAC hook fires k
        # times on every rank). Each loss is its sum over n, so the k backward passes add up to
        # the gradient of the share's mean loss (docs/algorithm.md §3).
        done = torch.zeros((), dtype=torch.float64)
        correct = 0.0
        sizes = split_batch(n, k)
        for m, (xm, ym) in enumerate(zip(torch.split(x, sizes), torch.split(targets, sizes), strict=True)):
            with self.precision.autocast():
                logits = self.model(xm)
                # The L2 term in shares n_m/n of the micro-batches: the k add up to one.
                loss = ((task.loss_sum(logits, ym) + len(ym) * task.penalty(self.model)) / n
                        if len(ym) else logits.sum() * 0)
            correct += task.metric_sum(logits, ym)
            if m == k - 1:
                self.loss = loss.detach().double() + done
                self._dispatch("on_forward_prop_end")
            done += loss.detach().double()
            self.precision.scale(loss).backward()
        return correct

    def _overflow(self, scaler: Any) -> None:
        """An fp16 step whose scaled gradients overflowed: skipped by the scaler (no optimizer
        step, no K-FAC step: its captures are dropped at the next ``on_batch_begin``)."""
        scale = scaler.get_scale()
        scaler.step(self.optimizer)  # finds the inf and skips
        scaler.update()
        self.overflows += 1
        if self.overflows == 1:
            self.log(f"trainer: step {self.step}: fp16 gradients overflowed at loss scale {scale:g}; step "
                     f"skipped, scale now {scaler.get_scale():g} (the scaler's normal start; said once)")
        self.optimizer.zero_grad(set_to_none=True)

    # -- stopping, faults and checkpoints -------------------------------------------------

    def _nonfinite(self, bad_loss: bool, bad: list[str], x: torch.Tensor) -> None:
        """Reports a NaN/Inf step, then skips it (no optimizer step) or stops with a checkpoint."""
        what = describe_nonfinite(bad_loss, bad, x)
        where = f"step {self.step} (epoch {self.epoch}, batch {self.batch})"
        self.optimizer.zero_grad(set_to_none=True)
        if self.on_nonfinite == "skip":
            self.log(f"trainer: {where}: {what}; step skipped")
            return
        saved = ""
        if self.checkpoint:
            # The weights are still those before this step: resuming retries (or, with
            # trainer.on_nonfinite=skip, skips) this very batch.
            saved = f"; checkpoint {self.save() or 'written by rank 0'}"
        raise NonFiniteError(f"{where}: {what}; stopped (trainer.on_nonfinite=stop){saved}")

    def _stop(self) -> None:
        """Checkpoints on every rank's agreed step and leaves the ``preempted`` marker."""
        path = self.save()
        self.stopped = self.signals.received or "a signal to another rank"
        if self.comm.rank == 0 and self.checkpoint.work_dir:
            atomic_write_text(Path(self.checkpoint.work_dir, PREEMPTED_FILE), f"{path}\n")
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
        """The checkpoint's content (``trainer.state.trainer_state``; a collective with several ranks)."""
        return trainer_state(self, epoch_done)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state_dict()`` (``trainer.state.load_trainer_state``).

        The metrics file then says what the checkpoint says: records written after it are dropped.
        """
        load_trainer_state(self, state)
        if self.metrics_path and self.comm.rank == 0:
            rewrite_metrics(self.metrics_path, self.history, self.test_records)

    # -- testing and the training clock ----------------------------------------------------

    def train_time(self) -> float:
        """Seconds of training so far on this rank's clock: ``fit()`` less every test evaluation.

        Rank 0's value goes into the records; a resumed run continues from its checkpoint's.
        """
        return self.clock.elapsed()

    def test(self) -> None:
        """Evaluates the test set with its hooks (LBANN's test lines); the training clock stops meanwhile."""
        running = self.clock.stop()
        self.model.eval()
        self._dispatch("on_test_begin")
        self.stats.test_loss, self.stats.test_accuracy = self.evaluate()
        self._dispatch("on_test_end")
        self.model.train()
        self._after_test()
        if running:
            self.clock.start()

    def periodic_test(self) -> None:
        """The test of ``test_every_steps``: no hooks (the epoch's record and lines stay as they were),
        one progress line and one ``"kind": "test"`` record; the training clock stops meanwhile."""
        running = self.clock.stop()
        loss, accuracy = self.evaluate()
        full = ""
        if self.full_train_objective:
            train_loss, train_accuracy = self.evaluate_train()
            full = f", full training objective {train_loss:.6g} ({self._metric_text(train_accuracy)})"
        self.log(f"trainer: step {self.step} (epoch {self.epoch}): test {self._metric_text(accuracy)}, "
                 f"objective {loss:.6g}{full}, {self.train_time():.1f}s of training")
        self._after_test()
        if running:
            self.clock.start()

    def _after_test(self) -> None:
        """Writes the test record (with ``test_every_steps``) and checks the target accuracy."""
        step, loss, accuracy = self._eval
        if self.test_every_steps and not (self.test_records and self.test_records[-1]["step"] == step):
            record = {
                "kind": "test", "step": step, "epoch": self.epoch,
                "epochs_done": self.epoch + self.batch / max(1, self.shape.train_iters),
                "train_time": self.train_time(), "wall_time": time.time() - self._start,
                "test_objective": loss, f"test_{self.task.metric_key}": accuracy,
            }
            if self.full_train_objective:
                train_loss, train_accuracy = self.evaluate_train()  # the periodic test's pass, or the final test's
                record.update({"train_objective_full": train_loss, f"train_{self.task.metric_key}_full": train_accuracy})
                target = self.stop_at_train_objective
                if target is not None and train_loss <= target:
                    self.reached_objective = train_loss
            self.test_records.append(record)
            if self.metrics_path and self.comm.rank == 0:
                append_metrics(self.metrics_path, record)
        if self.stop_at_test_accuracy is not None and accuracy >= self.stop_at_test_accuracy:
            self.reached = accuracy
        if self.max_train_seconds is not None and self.test_every_steps:
            # Each rank's clock differs a little: the run stops when any rank's budget is spent.
            spent = torch.tensor([float(self.train_time() >= self.max_train_seconds)], dtype=torch.float64)
            self.comm.allreduce_sum_([spent])
            self.out_of_time = self.out_of_time or bool(spent.item() > 0)

    def _metric_text(self, value: float) -> str:
        """``accuracy 97.50%`` or ``mean squared error 12.3``: the task's metric in a progress line."""
        if self.task.metric_unit == "%":
            return f"{self.task.metric_label} {value:.2f}%"
        return f"{self.task.metric_label} {value:.6g}"

    def evaluate(self) -> tuple[float, float]:
        """(Objective, accuracy in %) on the (never shuffled) test set; every rank evaluates its share.

        Every rank gets the same numbers. A second call at the same step (an epoch-end test
        right after a periodic one) returns the first call's result.
        """
        if self._eval is None or self._eval[0] != self.step:
            self._eval = (self.step, *self._evaluate_on(self.data.test_x, self.data.test_y))
        return self._eval[1], self._eval[2]

    def evaluate_train(self) -> tuple[float, float]:
        """(Objective, accuracy in %) on the whole training set, in order and in eval mode, as
        ``evaluate`` does the test set: the objective itself, not the epoch's running mean over
        weights that kept changing. Cached per step like ``evaluate``."""
        if self._train_eval is None or self._train_eval[0] != self.step:
            self._train_eval = (self.step, *self._evaluate_on(self.data.train_x, self.data.train_y))
        return self._train_eval[1], self._train_eval[2]

    def _evaluate_on(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(Objective, accuracy in %) of all of ``x, y`` in order, every rank its share of each batch."""
        batches = epoch_batches(len(y), self.mini_batch_size, 0, self.seed, self.comm.rank,
                                self.comm.world_size, shuffle=False)
        return evaluate(self.model, x, y, batches, self.device, self.comm, self.task)

    def target_met(self) -> bool:
        """Whether a test met ``stop_at_test_accuracy`` or ``stop_at_train_objective`` (the same on
        every rank: both numbers are sums over all ranks)."""
        return self.reached is not None or self.reached_objective is not None or self.out_of_time

    def _record(self) -> None:
        mean, mx, mn, sd = lbann_log.batch_time_stats(self.stats.batch_times)
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "train_objective": self.stats.train_loss,
            f"train_{self.task.metric_key}": self.stats.train_accuracy,
            "learning_rate": self.learning_rate(),
            "run_time": self.stats.epoch_time,
            "wall_time": time.time() - self._start,
            "minibatch_time": {"mean": mean, "max": mx, "min": mn, "stdev": sd},
        }
        if self.stats.test_accuracy is not None:
            record["test_objective"] = self.stats.test_loss
            record[f"test_{self.task.metric_key}"] = self.stats.test_accuracy
        for callback in self.callbacks:
            extra = getattr(callback, "metrics", None)
            if callable(extra):
                record.update(extra())
        self.history.append(record)
        if self.metrics_path and self.comm.rank == 0:
            append_metrics(self.metrics_path, record)

