"""The step watchdog: it ends a rank without progress, and names the ranks whose heartbeat stopped."""

from __future__ import annotations

import threading
import time

from kfac_callback.base import SingleProcess
from trainer.ranks import watchdog
from trainer.ranks.placement import Placement, gather_placements, placement_lines, ranks_by_host
from trainer.ranks.watchdog import StepWatchdog

PLACES = [Placement("node1", 0), Placement("node1", 1), Placement("node2", 0), Placement("node2", 1)]


def test_placements_lines_and_grouping():
    assert gather_placements(SingleProcess(), 0, host="node7") == [Placement("node7", 0)]
    assert placement_lines(PLACES)[2] == "rank 2/4: host node2, local rank 0"
    assert ranks_by_host([2, 3], PLACES) == "2, 3 (node2)"
    assert ranks_by_host([1, 3], PLACES) == "1 (node1); 3 (node2)"


def test_a_rank_without_progress_is_ended_and_the_lowest_live_rank_names_the_silent_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(watchdog, "LIVENESS_WAIT_S", 1.5)
    exits: list[tuple[int, int]] = []
    dogs = [StepWatchdog(0.4, r, PLACES, str(tmp_path), exit=lambda status, r=r: exits.append((r, status)))
            for r in range(4)]
    for dog in dogs[2:]:
        dog._heartbeat()  # ranks 2 and 3 were alive once, then their node was lost
    dogs[1].start()  # rank 1 lives on (its thread counts up) but, like rank 0, makes no progress
    dogs[0].start()
    deadline = time.monotonic() + 10
    while len(exits) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert (0, watchdog.EXIT_STATUS) in exits
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1, line  # rank 1 stays quiet: rank 0 is alive and speaks for the job
    assert line[0].startswith("kfac.py: error: no training progress for 0.4 s after step 0")
    assert "lost rank(s) 2, 3 (node2)" in line[0]


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
