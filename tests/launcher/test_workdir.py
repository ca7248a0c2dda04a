from __future__ import annotations

import json
import os
import stat
from datetime import datetime

from launcher.workdir import (
    WorkDirName,
    atomic_write_bytes,
    atomic_write_text,
    choose_work_dir,
    epoch_records,
    parse_work_dir_name,
    read_metrics,
    work_dir_name,
)

NOW = datetime(2024, 1, 31, 23, 59, 59)


def test_a_formatted_name_parses_back():
    assert parse_work_dir_name(work_dir_name("kfac", NOW)) == WorkDirName("20240131_235959", "kfac", 1)
    taken = {"/exp/20240131_235959_adam_lr"}
    second = choose_work_dir("/exp", "adam_lr", NOW, exists=taken.__contains__)
    assert parse_work_dir_name(second.name) == WorkDirName("20240131_235959", "adam_lr", 2)


def test_other_names_do_not_parse():
    for name in ("kfac", "2024_235959_kfac", "20240131_235959", "20240131_235959_", "checkpoints"):
        assert parse_work_dir_name(name) is None


def test_atomic_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "batch.sh"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n", mode=0o755)
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    atomic_write_bytes(tmp_path / "blob", b"\x00\x01")
    assert (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.sh", "blob"]


def test_read_metrics_skips_blank_torn_and_non_object_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    epoch = {"epoch": 0, "train_objective": 1.5}
    test = {"kind": "test", "step": 3, "test_accuracy": 90.0}
    path.write_text(json.dumps(test) + "\n\n" + json.dumps(epoch) + "\n[1]\n" + '{"epoch": 1, "tra')
    assert read_metrics(path) == [test, epoch]
    assert epoch_records(read_metrics(path)) == [epoch]
