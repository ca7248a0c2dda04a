"""The step watchdog: a job whose training makes no progress for ``trainer.step_timeout_s`` ends.

A rank that dies, or a node that is lost, leaves the other ranks waiting in a collective that
never completes, on every communicator (MPI, gloo, NCCL), until the job's time limit. This
callback notes each sign of progress (a forward pass, a backward pass, a step, a test); a
thread ends the process (status 4) once none came for the timeout, and the launcher (srun
with ``--kill-on-bad-exit``, mpiexec) then ends the job's other ranks.

Which rank was lost: each rank's watchdog thread also counts up a heartbeat file in the work
dir (a shared file system on a cluster) every second while its process lives, progress or not;
a rank that leaves normally writes ``done`` there. Before it reports, a rank reads every rank's
count, keeps counting for a few seconds, and reads again: a rank whose count did not move is
lost (counts, not file times, so the nodes' clocks need not agree).

One line per job, every time (docs/faults.md): the report is claimed by creating one file
(``reported``, exclusively) in the heartbeat dir, so whichever survivor knows first speaks and
every other one ends quietly. A survivor learns of the loss three ways: its collective fails
(gloo's reset connection: ``fail_if_ranks_lost``), no progress for the timeout, or the launcher
ending the job step (SIGTERM from srun when SLURM declares the node failed, or when another
survivor crashed): the main thread is then stuck in the collective, so the stop signals also
wake this thread (``signal.set_wakeup_fd``), which checks the heartbeats before the launcher's
SIGKILL follows (SLURM's KillWait, 30 s by default).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from kfac_callback.base import Callback
from trainer.ranks.placement import Placement, ranks_by_host
from trainer.ranks.reach import Reach

HEARTBEAT_DIR = ".heartbeats"
REPORTED_FILE = "reported"  # created by the one rank that prints the job's line
DONE = "done"  # a rank's heartbeat after it left training normally (never "lost")
EXIT_STATUS = 4
LIVENESS_WAIT_S = 3.0  # how long the counts are watched before a rank is called lost
QUIET_GRACE_S = 1.0  # what a survivor that did not report waits, so the reporter's line is out first
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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
        self._firing = threading.Lock()
        self._writing = threading.Lock()
        self._fired = False
        self._checking = threading.Event()  # set while the main thread checks its peers after an error
        self._wakeup: Optional[tuple[int, int]] = None  # the pipe the stop signals are written to
        self._saved_wakeup = -1
        self._reach: Optional[Reach] = None  # on several nodes: who is still reachable (trainer/ranks/reach.py)

    # -- progress --------------------------------------------------------------------

    def beat(self, step: Optional[int] = None) -> None:
        """Notes progress (cheap: no I/O; the thread writes the heartbeat)."""
        self._last = self._clock()
        if step is not None:
            self.step = step

    def _heartbeat(self, text: Optional[str] = None) -> None:
        if self.dir is None:
            return
        with self._writing:  # stop()'s "done" and the thread's counts share the temporary file
            if text is None and self._stop.is_set():
                return  # a count after "done" would undo it
            self._write_heartbeat(text)

    def _write_heartbeat(self, text: Optional[str]) -> None:
        assert self.dir is not None
        self._count += 1
        try:
            self.dir.mkdir(exist_ok=True)
            tmp = self.dir / f".rank-{self.rank}.tmp"
            tmp.write_text(f"{text or self._count}\n")
            os.replace(tmp, self.dir / f"rank-{self.rank}")  # a reader never sees a half-written count
        except OSError:
            pass  # a full or read-only disk must not end the run; the line then names no rank

    def _counts(self) -> list[Optional[str]]:
        assert self.dir is not None
        counts: list[Optional[str]] = []
        for r in range(len(self.placements)):
            try:
                counts.append((self.dir / f"rank-{r}").read_text().strip())
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
        """Starts the watching thread (once); from the main thread, the stop signals wake it too."""
        if self._thread is not None:
            return
        if self.rank == 0 and self.dir is not None:  # a requeued job's earlier report is stale
            (self.dir / REPORTED_FILE).unlink(missing_ok=True)
        self._heartbeat()  # a count at once: an earlier run's "done" in this dir is not this one's
        self._listen_for_stop_signals()
        self._listen_for_peers()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops watching (the run is over): this rank's heartbeat says it left normally."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._heartbeat(DONE)
        if self._reach is not None:
            self._reach.close()
        if self._wakeup is not None and threading.current_thread() is threading.main_thread():
            try:
                signal.set_wakeup_fd(self._saved_wakeup)
            except (OSError, ValueError):  # the one saved was closed meanwhile
                signal.set_wakeup_fd(-1)
            self._close_pipe_after_thread()

    def _close_pipe_after_thread(self) -> None:
        """Closes the signal pipe once the thread has left it: closed under a thread still reading
        it, its descriptor number could be reused by this thread's next open() and read away."""
        assert self._wakeup is not None
        read, write = self._wakeup
        try:
            os.write(write, b"\0")  # wakes the thread's select (0 is no stop signal)
        except OSError:
            pass  # the pipe is full: the thread is awake anyway
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            if self._thread.is_alive():
                return  # still reporting: it ends the process; two descriptors left open are harmless
        self._wakeup = None
        os.close(read)
        os.close(write)

    def _listen_for_stop_signals(self) -> None:
        """The stop signals' numbers written to a pipe this thread reads (main thread only): a
        Python handler cannot run while the main thread waits inside a collective."""
        if threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        try:
            self._saved_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except ValueError:
            os.close(read)
            os.close(write)
            return
        self._wakeup = (read, write)

    def _listen_for_peers(self) -> None:
        """On several nodes, a socket the peers can try to reach (a cut link is named by it)."""
        if self.dir is None or len({p.host for p in self.placements}) < 2:
            return
        from trainer.ranks.host_address import reachable_address

        reach = Reach(self.dir, self.rank, self.placements)
        try:
            reach.publish(reachable_address())
        except (OSError, RuntimeError):
            reach.close()  # no address for the others: the line then relies on the heartbeats
            return
        self._reach = reach

    def _signalled(self, period: float) -> Optional[str]:
        """Waits up to ``period`` s; the name of a stop signal that arrived meanwhile, if one did."""
        wakeup = self._wakeup
        if wakeup is None:
            self._stop.wait(period)
            return None
        ready, _, _ = select.select([wakeup[0]], [], [], period)
        data = os.read(wakeup[0], 64) if ready else b""  # stop() closes the pipe only after this thread ends
        names = [signal.Signals(n).name for n in data if n in STOP_SIGNALS]
        return names[0] if names else None

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while not self._stop.is_set():
            received = self._signalled(period)
            if self._stop.is_set():
                return
            self._heartbeat()
            if received is not None and self._check_after_signal(received):
                return
            if self._clock() - self._last > self.timeout_s and not self._checking.is_set():
                self.fire()
                return

    def _check_after_signal(self, name: str) -> bool:
        """A stop signal: normally the main thread checkpoints at the end of its step. If it made
        no progress while some rank went silent, the launcher is ending the job for a lost rank:
        report it now, before the SIGKILL that follows. True when it reported.

        A rank that never counted (still starting: a job cancelled early) is not called lost here.
        """
        last = self._last
        started = [count is not None for count in self._counts()]
        silent, cut = self.gone()
        gone = [r for r in silent if started[r]], cut
        if not any(gone) or self._last != last or self._stop.is_set():
            return False
        self.fire(f"the launcher sent {name} after step {self.step} while the ranks waited in a collective",
                  gone=gone)
        return True

    def lost_ranks(self, wait_s: Optional[float] = None) -> list[int]:
        """Ranks whose heartbeat count did not move in ``wait_s`` seconds (default ``LIVENESS_WAIT_S``);
        a rank that left normally (``done``) is not lost."""
        if self.dir is None:
            return []
        wait_s = LIVENESS_WAIT_S if wait_s is None else wait_s
        before = self._counts()
        self._beat_for(wait_s)
        after = self._counts()
        return [r for r, (b, a) in enumerate(zip(before, after, strict=True)) if a is None or (a == b and a != DONE)]

    def gone(self) -> tuple[list[int], list[int]]:
        """(the other ranks whose heartbeat stopped, those alive by it but on a node this rank
        cannot reach over the network)."""
        silent = [r for r in self.lost_ranks() if r != self.rank]
        if self._reach is None:
            return silent, []
        alive = [r for r in range(len(self.placements)) if r != self.rank and r not in silent]
        return silent, self._reach.unreachable(alive)

    def message(self, lost: list[int], cause: Optional[str] = None, cut: Optional[list[int]] = None) -> str:
        """The one line: what happened (no progress, or ``cause``), and who went silent or out of reach."""
        if cause is None:
            cause = (f"no training progress for {self.timeout_s:g} s after step {self.step} "
                     f"(trainer.step_timeout_s={self.timeout_s:g})")
        who = []
        if lost:
            who.append(f"lost rank(s) {ranks_by_host(lost, self.placements)}, silent for {LIVENESS_WAIT_S:g} s")
        if cut:
            who.append(f"rank(s) {ranks_by_host(cut, self.placements)} alive but unreachable over the network "
                       "(a cut link?)")
        if who:
            return f"kfac.py: error: {cause}: {'; '.join(who)}; the job ends (resume with trainer.resume=latest)"
        return f"kfac.py: error: {cause}: a rank or its node was lost, or a collective hangs; the job ends"

    def fire(self, cause: Optional[str] = None, gone: Optional[tuple[list[int], list[int]]] = None) -> bool:
        """Prints the job's line (if this rank claims the report first) and ends the process.

        Once per process: a second caller (the main thread's failed collective beside this
        thread's timeout) returns False at once, and the first one's exit ends them both.
        """
        with self._firing:
            if self._fired:
                return False
            self._fired = True
        lost, cut = self.gone() if gone is None else gone
        if self._claim(lost, cut):
            print(self.message(lost, cause, cut), file=sys.stderr, flush=True)
        else:
            time.sleep(QUIET_GRACE_S)
        self._exit(EXIT_STATUS)
        return True

    def _claim(self, lost: list[int], cut: list[int]) -> bool:
        """True for the one rank of the job that reports: the first to create the report file.
        A rank cut off from rank 0's node (where srun prints) leaves it to the ranks there.
        Without a heartbeat dir (or where it cannot be written), the lowest rank still alive."""
        if 0 in cut:
            return False
        if self.dir is not None:
            try:
                fd = os.open(self.dir / REPORTED_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            except OSError:
                pass
            else:
                os.write(fd, f"{self.rank}\n".encode())
                os.close(fd)
                return True
        alive = [r for r in range(len(self.placements)) if r not in lost]
        return not alive or alive[0] == self.rank

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
        if self.dir is None or self._stop.is_set():
            self.stop()
            return
        self._checking.set()  # the main thread is busy with this check, not stuck: no timeout meanwhile
        gone = self.gone()
        if not any(gone):
            self.stop()
            return
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if not self.fire(f"communication failed after step {self.step} ({type(err).__name__}: {first[:200]})",
                         gone=gone):
            # The watchdog's thread is reporting already: its exit ends this process.
            self._stop.wait(LIVENESS_WAIT_S + 10)
