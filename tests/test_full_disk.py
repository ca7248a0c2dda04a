"""A full disk through the real ``kfac.py``, on a small tmpfs: a checkpoint, metrics or log write
that fails for lack of space ends the run with one line (the file, the free space, what to do),
exit status 4, the previous checkpoint intact and no partial or temporary file left.

Needs root (mount); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["trainer.epochs=2", "data.max_train_samples=100", "data.max_test_samples=20", "trainer.mini_batch_size=20",
         "trainer.progress=false", "trainer.num_threads=1", "optimizer=momentum", "optimizer.learning_rate=0.01",
         "kfac.enabled=true", "kfac.disable_layers=[ip1,ip2]", "kfac.compute_interval_steps=3"]
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def small_disk(tmp_path):
    """Mounts a tmpfs; yields a function that sizes it; unmounts it at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = []

    def make(size: str) -> Path:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(mount)
        return mount

    yield make
    for m in mounted:
        subprocess.run(["umount", str(m)], check=True)


def fill(mount: Path, pages_left: int) -> None:
    """Leaves ``pages_left`` pages of the tmpfs free."""
    stat = os.statvfs(mount)
    with open(mount / "filler", "wb") as f:
        f.write(bytes(stat.f_bavail * stat.f_frsize - pages_left * PAGE))


def run(mount: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "kfac.py"), *SMALL, f"launcher.experiment_dir={mount}/exp",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_and_nothing_partial(result: subprocess.CompletedProcess, mount: Path, what: str) -> Path:
    assert result.returncode == 4, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("kfac.py: error: no space left on device writing "), line
    path = Path(line.split("writing ")[1].split(" (")[0])
    assert path.name.startswith(what) and str(path).startswith(str(mount)), line
    assert re.search(r" \(\d+\.\d [kM]B free there", line) and "continue with trainer.resume=" in line
    assert not [p for p in mount.rglob("*") if ".tmp" in p.name]  # no temporary file
    for metrics in mount.rglob("metrics.jsonl"):
        for text in metrics.read_text().splitlines(keepends=True):
            assert text.endswith("\n")
            json.loads(text)  # every line whole
    for log in [*mount.rglob("out.log"), *mount.rglob("err.log")]:
        assert log.read_text() == "" or log.read_text().endswith("\n"), log
    return path


def test_a_checkpoint_that_does_not_fit_ends_the_run_and_keeps_the_one_before(small_disk):
    mount = small_disk("60m")  # two 22 MB checkpoints fit, the third does not
    result = run(mount, "trainer.checkpoint_every_steps=3", "trainer.keep_checkpoints=5")
    path = assert_one_line_and_nothing_partial(result, mount, "step_000009.pt")
    assert "MB needed" in result.stderr and not path.exists()
    kept = list_checkpoints(path.parent)
    assert [p.name for p in kept] == ["step_000003.pt", "step_000006.pt"]
    assert load_checkpoint(kept[-1])["step"] == 6  # intact: it loads
    assert f"trainer.resume={path.parent.parent}" in result.stderr


@pytest.mark.parametrize("pages_left, what", [(2, "out.log"), (3, "metrics.jsonl")])
def test_a_log_or_metrics_line_that_does_not_fit_ends_the_run(small_disk, pages_left, what):
    # batch.sh and config.yaml take a page each; then out.log, then metrics.jsonl need theirs.
    mount = small_disk("1m")
    fill(mount, pages_left)
    result = run(mount, "trainer.keep_checkpoints=0")
    assert_one_line_and_nothing_partial(result, mount, what)


def test_a_work_dir_that_does_not_fit_is_not_left_half_made(small_disk):
    mount = small_disk("1m")
    fill(mount, 1)  # config.yaml fits, batch.sh does not
    result = run(mount)
    assert_one_line_and_nothing_partial(result, mount, "batch.sh")
    assert list((mount / "exp").iterdir()) == []
