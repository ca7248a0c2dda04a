"""The training loop: hook order, determinism, metrics file and the log as golden text."""

from __future__ import annotations

import json
import re

import torch

from tests.support.hooks import HookRecorder
from tests.support.trainers import make_trainer
from trainer.observe.callbacks import MemoryCallback, PrintCallback, TimerCallback


def test_hooks_are_called_in_lbanns_order_for_a_two_batch_run():
    rec = HookRecorder()
    make_trainer([rec]).fit()
    batch = ["on_batch_begin", "on_forward_prop_end", "on_backward_prop_end",
             "on_optimize_begin", "on_optimize_end", "on_batch_end"]
    assert rec.calls == (["on_setup_end", "on_train_begin", "on_epoch_begin"] + batch + batch
                         + ["on_epoch_end", "on_train_end", "on_test_begin", "on_test_end"])


def test_test_every_epoch_adds_a_test_after_each_epoch():
    rec = HookRecorder()
    make_trainer([rec], epochs=2, test_every_epoch=True).fit()
    assert rec.calls.count("on_test_begin") == 2
    rec = HookRecorder()
    make_trainer([rec], epochs=2).fit()
    assert rec.calls.count("on_test_begin") == 1


def test_same_seed_gives_the_same_numbers_on_the_cpu():
    runs = []
    for _ in range(2):
        t = make_trainer([TimerCallback()], epochs=2, model="cnn", optimizer="momentum")
        history = t.fit()
        runs.append(([(r["train_objective"], r["train_accuracy"]) for r in history],
                     t.stats.test_loss, [p.clone() for p in t.model.parameters()]))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2], strict=True))


def test_metrics_file_has_one_json_object_per_epoch(tmp_path):
    path = tmp_path / "metrics.jsonl"
    make_trainer([TimerCallback()], epochs=3, metrics_path=str(path)).fit()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert "test_accuracy" in records[2] and "test_accuracy" not in records[0]
    assert set(records[0]["minibatch_time"]) == {"mean", "max", "min", "stdev"}


GOLDEN_LOG = """\
--------------------------------------------------------------------------------
[0] Epoch : stats formated [tr/v/te] iter/epoch = [3/0/1]
            global MB = [  10/   0/  10] global last MB = [   5  /   0  /  10  ]
             local MB = [  10/   0/  10]  local last MB = [   5+0/   0+0/  10+0]
--------------------------------------------------------------------------------
model0 (instance 0) training epoch 0 objective function : <NUM>
model0 (instance 0) training epoch 0 accuracy : <NUM>%
model0 (instance 0) training epoch 0 run time : <NUM>s
model0 (instance 0) training epoch 0 mini-batch time statistics : <NUM>s mean, <NUM>s max, <NUM>s min, <NUM>s stdev
Model 0 host memory usage statistics : <NUM> GiB peak RSS
model0 (instance 0) test objective function : <NUM>
model0 (instance 0) test accuracy : <NUM>%"""


def test_log_is_lbanns_format_with_numbers_masked():
    lines: list[str] = []
    make_trainer([TimerCallback(), PrintCallback(), MemoryCallback()], n_train=25, lines=lines).fit()
    text = "\n".join(lines)
    masked = re.sub(r"(?<=: )[-0-9.e+]+|(?<=, )[-0-9.e+]+", "<NUM>", text, flags=re.M)
    assert masked == GOLDEN_LOG
