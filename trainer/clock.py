"""The training clock: seconds of training, tests left out, carried across a resume."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Optional


class TrainClock:
    """Accumulates the time between ``start()`` and ``stop()``; ``total`` holds what was stopped."""

    def __init__(self, total: float = 0.0) -> None:
        self.total = total  # seconds before the clock last stopped (a resumed run sets its checkpoint's)
        self._since: Optional[float] = None  # perf_counter() when the clock last started (None: stopped)

    def elapsed(self) -> float:
        """Seconds so far, the running stretch included."""
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self.total + running

    def start(self) -> None:
        """Starts the clock (no-op if it runs)."""
        if self._since is None:
            self._since = time.perf_counter()

    def stop(self) -> bool:
        """Stops the clock; returns whether it was running."""
        if self._since is None:
            return False
        self.total += time.perf_counter() - self._since
        self._since = None
        return True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stops the clock meanwhile (a test, say), then lets it run on if it ran."""
        running = self.stop()
        yield
        if running:
            self.start()


class WallClock:
    """Seconds of the run so far by the wall clock (the records' ``wall_time``), tests included.

    A resumed run continues from its checkpoint's count (``resume_at``), so a run's
    ``wall_time`` only grows; the time it lay stopped is left out.
    """

    def __init__(self) -> None:
        self._offset = 0.0
        self._since = time.time()

    def elapsed(self) -> float:
        """Seconds since the run began, the stretches before a resume included."""
        return self._offset + time.time() - self._since

    def resume_at(self, seconds: float) -> None:
        """Continues from ``seconds`` (a checkpoint's ``wall_time``) from now on."""
        self._offset, self._since = seconds, time.time()
