"""The one training loop. Reads top to bottom; callbacks hook in at LBANN's named points.

Each rank runs this loop on its share of every global mini-batch. The loss is the mean over
the rank's local samples; gradients are averaged over ranks right after backward, so every
rank steps with the same gradient and keeps the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from trainer import lbann_log
from trainer.callbacks import Callback
from trainer.data import batch_plan, epoch_batches


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
        metrics_path: where one JSON line per epoch goes (None: nowhere).
        log: prints a line (on rank 0).
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
        metrics_path: Optional[str] = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.epochs, self.mini_batch_size = epochs, mini_batch_size
        self.callbacks = list(callbacks)
        self.comm, self.device, self.seed = comm, device, seed
        self.test_every_epoch = test_every_epoch
        self.metrics_path = metrics_path
        self.log = log
        self.epoch = 0
        self.step = 0
        self.stats = Stats()
        self.history: list[dict[str, Any]] = []
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
        """Trains for ``epochs`` epochs, tests at the end; returns the per-epoch records."""
        self._dispatch("on_train_begin")
        for epoch in range(self.epochs):
            self.epoch = epoch
            self.train_epoch()
            last = self.epoch == self.epochs - 1
            if last:
                self._dispatch("on_train_end")
            if last or self.test_every_epoch:
                self.test()
            self._record()
        if self.epochs == 0:
            self._dispatch("on_train_end")
            self.test()
        return self.history

    def train_epoch(self) -> None:
        """One pass over the training set, each rank on its share of every global batch."""
        self.model.train()
        self.stats.test_loss = self.stats.test_accuracy = None
        self._dispatch("on_epoch_begin")
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
        batches = epoch_batches(
            len(self.data.train_y),
            self.mini_batch_size,
            self.epoch,
            self.seed,
            self.comm.rank,
            self.comm.world_size,
            shuffle=True,
        )
        for index in batches:
            self._dispatch("on_batch_begin")
            x = self.data.train_x[index].to(self.device, non_blocking=True)
            y = self.data.train_y[index].to(self.device, non_blocking=True)
            logits = self.model(x)
            self.loss = F.cross_entropy(logits, y)
            self._dispatch("on_forward_prop_end")
            self.optimizer.zero_grad(set_to_none=True)
            self.loss.backward()
            self.average_gradients()
            self._dispatch("on_backward_prop_end")
            self._dispatch("on_optimize_begin")
            self.optimizer.step()
            self._dispatch("on_optimize_end")
            self.step += 1
            with torch.no_grad():
                n = len(y)
                totals += torch.tensor(
                    [self.loss.item() * n, (logits.argmax(1) == y).sum().item(), n], dtype=torch.float64
                )
            self._dispatch("on_batch_end")
        self.comm.allreduce_sum_([totals])
        self.stats.train_loss = (totals[0] / totals[2]).item()
        self.stats.train_accuracy = (100.0 * totals[1] / totals[2]).item()
        self._dispatch("on_epoch_end")

    def average_gradients(self) -> None:
        """Averages the gradients over ranks in one collective on a flat buffer."""
        if self.comm.world_size == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.comm.allreduce_sum_([flat])
        flat /= self.comm.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def test(self) -> None:
        """Evaluates the (never shuffled) test set; every rank evaluates its share."""
        self.model.eval()
        self._dispatch("on_test_begin")
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
        self.stats.test_loss = (totals[0] / totals[2]).item()
        self.stats.test_accuracy = (100.0 * totals[1] / totals[2]).item()
        self._dispatch("on_test_end")
        self.model.train()

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
