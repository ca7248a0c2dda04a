"""The step watchdog: a job whose training makes no progress for ``trainer.step_timeout_s`` ends.

A rank that dies, or a node that is lost, leaves the other ranks waiting in a collective that
never completes, on every communicator (MPI, gloo, NCCL), until the job's time limit. This
callback notes each sign of progress (a forward pass, a backward pass, a step, a test); a
thread ends the process (status 4) once none came for the timeout, and the launcher (srun
with ``--kill-on-bad-exit``, mpiexec) then ends the job's other ranks.

Which rank was lost: each rank's watchdog thread also counts up a heartbeat file in the work
dir (a shared file system on a cluster) every second while its process lives, progress or not.
When the watchdog fires it reads every rank's count, keeps counting for a few seconds, and reads
again: a rank whose count did not move is lost (counts, not file times, so the nodes' clocks
need not agree). The lowest-numbered rank still alive prints one line naming the lost ranks and
their hosts; the other survivors end quietly a moment later.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from kfac_callback.base import Callback
from trainer.ranks.placement import Placement, ranks_by_host

HEARTBEAT_DIR = ".heartbeats"
EXIT_STATUS = 4
LIVENESS_WAIT_S = 3.0  # how long the counts are watched before a rank is called lost
QUIET_GRACE_S = 3.0  # what the other survivors wait, so the line is printed before srun ends the step
# (the printing rank itself waits LIVENESS_WAIT_S + 1 s, still counting: see fire())


class StepWatchdog(Callback):
    """Ends a rank whose training has made no progress for ``timeout_s`` seconds (see the module).

    Args:
        timeout_s: Seconds without progress (> 0).
        rank: This rank.
        placements: Every rank's host and local rank (``trainer.ranks.placement``).
        work_dir: Where the heartbeat files go (``None``: no heartbeats, the line names no rank).
        exit: Ends the process (tests pass their own).
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(self, timeout_s: float, rank: int, placements: list[Placement], work_dir: Optional[str] = None,
                 exit: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s, self.rank, self.placements = float(timeout_s), rank, placements
        self.dir = Path(work_dir, HEARTBEAT_DIR) if work_dir else None
        self._exit, self._clock = exit, clock
        self.step = 0
        self._last = clock()
        self._count = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- progress --------------------------------------------------------------------

    def beat(self, step: Optional[int] = None) -> None:
        """Notes progress (cheap: no I/O; the thread writes the heartbeat)."""
        self._last = self._clock()
        if step is not None:
            self.step = step

    def _heartbeat(self) -> None:
        if self.dir is None:
            return
        self._count += 1
        try:
            self.dir.mkdir(exist_ok=True)
            tmp = self.dir / f".rank-{self.rank}.tmp"
            tmp.write_text(f"{self._count}\n")
            os.replace(tmp, self.dir / f"rank-{self.rank}")  # a reader never sees a half-written count
        except OSError:
            pass  # a full or read-only disk must not end the run; the line then names no rank

    def _counts(self) -> list[Optional[str]]:
        assert self.dir is not None
        counts: list[Optional[str]] = []
        for r in range(len(self.placements)):
            try:
                counts.append((self.dir / f"rank-{r}").read_text())
            except OSError:
                counts.append(None)
        return counts

    def on_train_begin(self, trainer: Any) -> None:
        self.beat(trainer.step)
        self.start()

    def on_train_end(self, trainer: Any) -> None:
        self.beat(trainer.step)

    def on_batch_begin(self, trainer: Any) -> None:
        self.beat(trainer.step)

    def on_forward_prop_end(self, trainer: Any) -> None:
        self.beat()

    def on_backward_prop_end(self, trainer: Any) -> None:
        self.beat()

    def on_batch_end(self, trainer: Any) -> None:
        self.beat(trainer.step)

    def on_test_begin(self, trainer: Any) -> None:
        self.beat()

    def on_test_end(self, trainer: Any) -> None:
        self.beat()

    # -- the thread ------------------------------------------------------------------

    def start(self) -> None:
        """Starts the watching thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops watching (the run is over)."""
        self._stop.set()

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(period):
            self._heartbeat()
            if self._clock() - self._last > self.timeout_s:
                self.fire()
                return

    def lost_ranks(self, wait_s: Optional[float] = None) -> list[int]:
        """Ranks whose heartbeat count did not move in ``wait_s`` seconds (default ``LIVENESS_WAIT_S``)."""
        if self.dir is None:
            return []
        wait_s = LIVENESS_WAIT_S if wait_s is None else wait_s
        before = self._counts()
        self._beat_for(wait_s)
        after = self._counts()
        return [r for r, (b, a) in enumerate(zip(before, after, strict=True)) if a is None or a == b]

    def message(self, lost: list[int], cause: Optional[str] = None) -> str:
        """The one line: what happened (no progress, or ``cause``), and who went silent."""
        if cause is None:
            head = (f"kfac.py: error: no training progress for {self.timeout_s:g} s after step {self.step} "
                    f"(trainer.step_timeout_s={self.timeout_s:g})")
        else:
            head = f"kfac.py: error: communication failed after step {self.step} ({cause})"
        if lost:
            return (f"{head}: lost rank(s) {ranks_by_host(lost, self.placements)}, silent for "
                    f"{LIVENESS_WAIT_S:g} s; the job ends (resume with trainer.resume=latest)")
        return f"{head}: a rank or its node was lost, or a collective hangs; the job ends"

    def fire(self, cause: Optional[str] = None) -> None:
        """Prints the line (if this is the lowest rank still alive) and ends the process."""
        lost = [r for r in self.lost_ranks() if r != self.rank]
        alive = [r for r in range(len(self.placements)) if r not in lost]
        if not alive or alive[0] == self.rank:
            print(self.message(lost, cause), file=sys.stderr, flush=True)
            # Still counting for a while: a survivor whose own watch began late must see this
            # rank alive, or it would think itself the lowest one left and print a second line.
            self._beat_for(LIVENESS_WAIT_S + 1.0)
        else:
            time.sleep(QUIET_GRACE_S)
        self._exit(EXIT_STATUS)

    def _beat_for(self, seconds: float) -> None:
        deadline = self._clock() + seconds
        while self._clock() < deadline:
            self._heartbeat()
            time.sleep(0.25)

    def fail_if_ranks_lost(self, err: BaseException) -> None:
        """After ``err`` in a collective: if a rank is gone, the one line and the end of this rank.

        Returns (so the caller re-raises ``err``) when every rank is still alive: then the error
        is not a lost rank's, and its own traceback says more.
        """
        self.stop()
        if self.dir is None or not self.lost_ranks():
            return
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        self.fire(f"{type(err).__name__}: {first[:200]}")
