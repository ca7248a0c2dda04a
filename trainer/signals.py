"""Stop signals: SIGTERM / SIGUSR1 ask the trainer to checkpoint and stop at the next step."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional


class StopSignals:
    """Remembers that SIGTERM or SIGUSR1 arrived; the trainer stops at the next step boundary.

    The handlers only set a flag: checkpointing inside a signal handler could interrupt a
    collective half-way. ``request()`` does the same from code (tests, other callbacks).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: Optional[str] = None

    def request(self, reason: str = "request") -> None:
        """Asks for a stop at the next step boundary."""
        self.received = self.received or reason

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handles the signals while inside (main thread only; elsewhere signals are left alone)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        saved = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        for sig in self.SIGNALS:
            signal.signal(sig, lambda signum, frame: self.request(signal.Signals(signum).name))
        try:
            yield
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
