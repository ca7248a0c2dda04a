"""The step watchdog: it ends a rank without progress, and names the ranks whose heartbeat stopped."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kfac_callback.base import SingleProcess
from trainer.ranks import watchdog
from trainer.ranks.placement import Placement, gather_placements, placement_lines, ranks_by_host
from trainer.ranks.watchdog import StepWatchdog

ROOT = Path(__file__).resolve().parents[2]
PLACES = [Placement("node1", 0), Placement("node1", 1), Placement("node2", 0), Placement("node2", 1)]


def test_placements_lines_and_grouping():
    assert gather_placements(SingleProcess(), 0, host="node7") == [Placement("node7", 0)]
    assert placement_lines(PLACES)[2] == "rank 2/4: host node2, local rank 0"
    assert ranks_by_host([2, 3], PLACES) == "2, 3 (node2)"
    assert ranks_by_host([1, 3], PLACES) == "1 (node1); 3 (node2)"


def test_a_rank_without_progress_is_ended_and_one_survivor_names_the_silent_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(watchdog, "LIVENESS_WAIT_S", 1.5)
    exits: list[tuple[int, int]] = []
    dogs = [StepWatchdog(0.4, r, PLACES, str(tmp_path), exit=lambda status, r=r: exits.append((r, status)))
            for r in range(4)]
    for dog in dogs[2:]:
        dog._heartbeat()  # ranks 2 and 3 were alive once, then their node was lost
    dogs[1].start()  # rank 1 lives on (its thread counts up) but, like rank 0, makes no progress
    dogs[0].start()
    deadline = time.monotonic() + 10
    while len(exits) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(exits) == [(0, watchdog.EXIT_STATUS), (1, watchdog.EXIT_STATUS)]
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1, line  # the first to claim the report speaks; the other ends quietly
    assert line[0].startswith("kfac.py: error: no training progress for 0.4 s after step 0")
    assert "lost rank(s) 2, 3 (node2)" in line[0]
    assert (tmp_path / watchdog.HEARTBEAT_DIR / watchdog.REPORTED_FILE).read_text().strip() in ("0", "1")


def test_a_rank_that_left_normally_is_not_lost_and_a_stale_report_is_cleared(tmp_path, monkeypatch):
    monkeypatch.setattr(watchdog, "LIVENESS_WAIT_S", 0.6)
    dogs = [StepWatchdog(60, r, PLACES[:3], str(tmp_path), exit=lambda status: None) for r in range(3)]
    beats = tmp_path / watchdog.HEARTBEAT_DIR
    beats.mkdir()
    (beats / watchdog.REPORTED_FILE).write_text("2\n")  # an earlier, requeued run's
    dogs[0].start()
    assert not (beats / watchdog.REPORTED_FILE).exists()
    dogs[1]._heartbeat()
    dogs[1].stop()  # rank 1 finished its training and left
    dogs[2]._heartbeat()  # rank 2 went silent
    assert dogs[0].lost_ranks() == [2]
    dogs[0].stop()
    assert (beats / "rank-0").read_text().strip() == watchdog.DONE


def test_after_stop_the_thread_reads_none_of_the_main_threads_files(tmp_path, monkeypatch):
    # The file opened next takes the lowest free descriptor: the signal pipe's, had stop() closed
    # it while the thread was about to select on it; the thread would then read the file's start.
    def late_select(*args):
        time.sleep(0.5)  # the thread, descheduled between taking the pipe and its select
        return select.select(*args)

    monkeypatch.setattr(watchdog, "select", SimpleNamespace(select=late_select))
    dog = StepWatchdog(60, 0, PLACES[:1], str(tmp_path), exit=lambda status: None)
    dog.start()
    time.sleep(0.1)
    dog.stop()
    data = tmp_path / "data.txt"
    data.write_text("x" * 100)
    with data.open() as f:
        time.sleep(1.0)  # past the thread's select
        assert f.read() == "x" * 100
    assert not dog._thread.is_alive()


def test_progress_keeps_it_quiet_and_an_error_with_every_rank_alive_is_left_to_its_traceback(tmp_path):
    exits: list[int] = []
    dog = StepWatchdog(0.5, 0, PLACES[:1], str(tmp_path), exit=exits.append)
    dog.start()
    stop = threading.Event()

    def steps() -> None:
        while not stop.is_set():
            dog.beat(1)
            time.sleep(0.05)

    threading.Thread(target=steps, daemon=True).start()
    time.sleep(1.5)
    stop.set()
    assert exits == []
    dog.fail_if_ranks_lost(RuntimeError("a bug, not a lost rank"))  # its only rank is alive: returns
    assert exits == []


# A rank whose main thread waits in a collective that will never complete (a sleep here), with
# rank 1's heartbeat stopped or counting; the launcher's SIGTERM must wake the watchdog's thread.
STUCK_RANK = """
import os, sys, threading, time
from trainer.ranks import watchdog
from trainer.ranks.placement import Placement
from trainer.ranks.signals import StopSignals
watchdog.LIVENESS_WAIT_S = 1.0
work_dir, peer = sys.argv[1], sys.argv[2]
dog = watchdog.StepWatchdog(600, 0, [Placement("node1", 0), Placement("node2", 0)], work_dir)
peer_dog = watchdog.StepWatchdog(600, 1, [Placement("node1", 0), Placement("node2", 0)], work_dir)
if peer != "starting":  # a rank still starting has written no count yet
    peer_dog._heartbeat()
if peer == "alive":
    threading.Thread(target=lambda: [peer_dog._heartbeat() or time.sleep(0.2) for _ in range(200)], daemon=True).start()
signals = StopSignals()
with signals.installed():
    dog.start()
    print("ready", flush=True)
    time.sleep(3)  # no progress: the collective
print("still here after", signals.received, flush=True)
"""


@pytest.mark.parametrize("peer", ["lost", "alive", "starting"])
def test_the_launchers_sigterm_wakes_the_watchdog_which_names_a_lost_rank_before_the_sigkill(tmp_path, peer):
    proc = subprocess.Popen([sys.executable, "-c", STUCK_RANK, str(tmp_path), peer], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    if peer == "lost":
        assert proc.returncode == watchdog.EXIT_STATUS, (out, err)
        assert err.strip().splitlines() == [
            "kfac.py: error: the launcher sent SIGTERM after step 0 while the ranks waited in a collective: "
            "lost rank(s) 1 (node2), silent for 1 s; the job ends (resume with trainer.resume=latest)"], err
        assert took < 5, took  # well within SLURM's KillWait before its SIGKILL
    else:  # a preemption with every rank alive (or one still starting): the main thread stops at its step
        assert proc.returncode == 0 and "still here after SIGTERM" in out and "kfac.py" not in err, (out, err)


def test_a_node_alive_by_its_heartbeat_but_out_of_reach_is_named_from_rank_0s_side_only(tmp_path, monkeypatch, capsys):
    """A cut link: node2's ranks count on (the file system still works) but take no connection."""
    monkeypatch.setattr(watchdog, "LIVENESS_WAIT_S", 1.5)  # the threads count once a second
    places = [Placement("node1", 0), Placement("node2", 0)]
    exits: list[tuple[int, int]] = []
    dogs = [StepWatchdog(600, r, places, str(tmp_path), exit=lambda status, r=r: exits.append((r, status)))
            for r in range(2)]
    for dog in dogs:
        dog.start()
    assert (tmp_path / watchdog.HEARTBEAT_DIR / "addr-1").exists()  # where rank 1 listens
    assert dogs[0].gone() == ([], [])  # both count, both answer
    dogs[1]._reach.close()  # node2 out of reach: no connection is taken there
    dogs[0]._reach.close()
    dogs[1].fire()  # node2's side cannot reach rank 0's node: it leaves the report to that side
    assert exits == [(1, watchdog.EXIT_STATUS)] and capsys.readouterr().err == ""
    dogs[1]._reach = None  # (rank 1's thread still counts: alive by its heartbeat)
    from trainer.ranks.reach import Reach

    dogs[0]._reach = Reach(dogs[0].dir, 0, places)
    dogs[0].fire()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kfac.py: error: no training progress for 600 s after step 0 (trainer.step_timeout_s=600): "
                   "rank(s) 1 (node2) alive but unreachable over the network (a cut link?); the job ends "
                   "(resume with trainer.resume=latest)"], err
    assert exits[-1] == (0, watchdog.EXIT_STATUS)
    for dog in reversed(dogs):  # the signal wake-up each replaced, restored in turn
        dog.stop()
