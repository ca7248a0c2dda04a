from __future__ import annotations

from types import SimpleNamespace

from trainer.observe import lbann_log

GOLDEN_BLOCK = """\
--------------------------------------------------------------------------------
[19] Epoch : stats formated [tr/v/te] iter/epoch = [600/0/100]
            global MB = [ 100/   0/ 100] global last MB = [ 100  /   0  / 100  ]
             local MB = [  25/   0/  25]  local last MB = [  25+0/   0+0/  25+0]
--------------------------------------------------------------------------------"""

GOLDEN_LINES = """\
model0 (instance 0) training epoch 19 objective function : 0.000145131
model0 (instance 0) training epoch 19 accuracy : 100%
model0 (instance 0) training epoch 19 run time : 7.60849s
model0 (instance 0) training epoch 19 mini-batch time statistics : 0.0125s mean, 0.015s max, 0.01s min, 0.00176777s stdev"""


def test_epoch_block_is_lbanns_text_at_four_ranks():
    shape = lbann_log.EpochShape(train_iters=600, test_iters=100, global_mb=100, global_last_train=100,
                              global_last_test=100, world_size=4)
    assert lbann_log.epoch_block(19, shape) == GOLDEN_BLOCK


def test_training_and_test_lines_use_lbanns_number_format():
    stats = SimpleNamespace(train_loss=0.000145131, train_accuracy=100.0, epoch_time=7.60849,
                            batch_times=[0.01, 0.015, 0.0125, 0.0125])
    assert lbann_log.training_lines(19, stats) == GOLDEN_LINES
    assert lbann_log.test_lines(0.070923, 98.2) == (
        "model0 (instance 0) test objective function : 0.070923\n"
        "model0 (instance 0) test accuracy : 98.2%")


def test_number_format_is_printf_g():
    assert [lbann_log.g(x) for x in (100.0, 98.23, 1e-5, 123456789.0, 0.1 + 0.2)] == [
        "100", "98.23", "1e-05", "1.23457e+08", "0.3"]


UNEVEN_BLOCK = """\
--------------------------------------------------------------------------------
[0] Epoch : stats formated [tr/v/te] iter/epoch = [11/0/1]
            global MB = [ 100/   0/ 100] global last MB = [  30  /   0  / 100  ]
             local MB = [  12/   0/  12]  local last MB = [   3+6/   0+0/  12+4]
--------------------------------------------------------------------------------"""


def test_epoch_block_shows_an_uneven_split_as_base_plus_extra():
    """100 over 8 ranks is 13 or 12 a rank: local MB the base 12, local last MB base+extra."""
    shape = lbann_log.EpochShape(train_iters=11, test_iters=1, global_mb=100, global_last_train=30,
                                 global_last_test=100, world_size=8)
    assert lbann_log.epoch_block(0, shape) == UNEVEN_BLOCK

