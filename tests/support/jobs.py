"""Independent subprocess jobs started together and awaited on first use.

A real-rank job spends part of its time starting up (imports, MPI's handshake) on one core;
started side by side, jobs fill each other's gaps on a small machine. A module-scoped fixture
starts them all, and each test asserts on the results it needs (``result``).
"""

from __future__ import annotations

import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional


class Jobs:
    """Runs ``subprocess.run`` for each started job, at most ``at_once`` at a time.

    Args:
        at_once: Jobs running together (each may hold several ranks: keep memory in mind).
        root: A folder for the jobs' outputs, for the tests to find them.
    """

    def __init__(self, at_once: int = 3, root: Optional[Path] = None) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=at_once)
        self._futures: dict[str, Future[subprocess.CompletedProcess]] = {}

    def start(self, name: str, argv: list[str], **kwargs: Any) -> None:
        """Queues ``argv`` under ``name``; ``kwargs`` go to ``subprocess.run`` (output is captured)."""
        assert name not in self._futures, name
        self._futures[name] = self._pool.submit(subprocess.run, argv, capture_output=True, text=True, **kwargs)

    def result(self, name: str) -> subprocess.CompletedProcess:
        """The finished job ``name`` (waits for it; re-raises its ``TimeoutExpired``)."""
        return self._futures[name].result()

    def close(self) -> None:
        """Waits for every job, also those no test asked about."""
        self._pool.shutdown(wait=True)
