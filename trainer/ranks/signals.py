"""Stop signals: SIGTERM / SIGUSR1 / Ctrl-C ask the trainer to checkpoint and stop at the next step."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

from launcher.env import rank_info

CTRL_C_NOTE = "Ctrl-C: stopping with a checkpoint at the end of this step (Ctrl-C again to quit now)"


class StopSignals:
    """Remembers that SIGTERM, SIGUSR1 or SIGINT arrived; the trainer stops at the next step boundary.

    The handlers only set a flag: checkpointing inside a signal handler could interrupt a
    collective half-way. A second Ctrl-C does not wait: it raises ``KeyboardInterrupt`` as
    Python's own handler would. ``request()`` does the same as a signal, from code (tests,
    other callbacks).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[str] = None

    def request(self, reason: str = "request") -> None:
        """Asks for a stop at the next step boundary."""
        self.received = self.received or reason

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        # One rank of several stays quiet: the launcher that passed the Ctrl-C on has said it.
        if signum == signal.SIGINT and self.received is None and rank_info(os.environ).world_size == 1:
            print(CTRL_C_NOTE, file=sys.stderr, flush=True)
        self.request(signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handles the signals while inside (main thread only; elsewhere signals are left alone)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        # A signal the process was started to ignore stays ignored (a shell's `cmd &` ignores Ctrl-C).
        saved = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        saved = {sig: handler for sig, handler in saved.items() if handler is not signal.SIG_IGN}
        for sig in saved:
            signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
