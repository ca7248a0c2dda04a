"""Where a K-FAC step spends its time, phase by phase (read by benchmarks/step_time.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseClock:
    """Names the running phase and sums the seconds spent in each.

    Attributes:
        phase: The phase running now (``""`` outside any); a benchmark's communicator reads it
            to attribute the bytes it sends.
        times: Seconds per phase since construction (nested phases count in both).
    """

    def __init__(self) -> None:
        self.phase = ""
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        outer, self.phase = self.phase, name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
            self.phase = outer
