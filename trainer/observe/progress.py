"""Progress bars (tqdm) over epochs and mini-batches, for interactive terminals only.

Logs are what batch jobs leave behind, so the bars stay out of them: with
``trainer.progress=auto`` they show only on rank 0, only when stdout is a terminal and never
inside a SLURM job. The bars are drawn on the process's own stdout (``sys.__stdout__``), not
through ``sys.stdout``, which the launcher tees into the work dir's out.log. The LBANN log lines
are printed through ``ProgressCallback.wrap``, which clears the bars, prints the line unchanged
and redraws the bars below it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any, Optional

from tqdm import tqdm

from kfac_callback.base import Callback

SETTINGS = ("auto", "true", "false")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_enabled(setting: Any, *, rank: int, tty: bool, environ: Mapping[str, str]) -> bool:
    """Whether this process shows progress bars.

    Args:
        setting: ``trainer.progress``: ``auto``, ``true`` or ``false`` (booleans are accepted).
        rank: This process's rank; only rank 0 ever shows bars.
        tty: Whether stdout is a terminal; ``auto`` needs one.
        environ: The environment; ``auto`` is off inside a SLURM job (``SLURM_JOB_ID``), and in a
            launched rank (``KFAC_LAUNCHED``) without a terminal.

    Raises:
        ValueError: For a setting other than auto, true or false.
    """
    value = str(setting).lower()
    if value not in SETTINGS:
        raise ValueError(f"trainer.progress: {setting!r} is not one of {', '.join(SETTINGS)}")
    if rank != 0 or value == "false":
        return False
    if value == "true":
        return True
    if "SLURM_JOB_ID" in environ or (environ.get("KFAC_LAUNCHED") and not tty):
        return False
    return tty


def terminal() -> IO[str]:
    """The process's own stdout, beneath any tee a launcher put in ``sys.stdout``."""
    return sys.__stdout__ if sys.__stdout__ is not None else sys.stdout


class ProgressCallback(Callback):
    """An epoch bar with a mini-batch bar below it; both vanish when done (``leave=False``).

    Args:
        enabled: Whether to draw anything; a disabled callback is a no-op.
        stream: Where the bars go; ``None`` means ``terminal()`` at the time of drawing.
        mininterval: The least time between redraws, in seconds (0: every update).
    """

    def __init__(self, enabled: bool, stream: Optional[IO[str]] = None, mininterval: float = 0.1) -> None:
        self.enabled = enabled
        self.stream = stream
        self.mininterval = mininterval
        self._epochs: Optional[tqdm] = None
        self._batches: Optional[tqdm] = None

    @classmethod
    def from_setting(cls, setting: Any, rank: int, stream: Optional[IO[str]] = None,
                     environ: Optional[Mapping[str, str]] = None) -> ProgressCallback:
        """Builds the callback, enabled by ``progress_enabled`` for this rank and stream.

        ``auto`` needs both ``sys.stdout`` and the bars' stream to be terminals.
        """
        environ = os.environ if environ is None else environ
        target = stream if stream is not None else terminal()
        tty = _isatty(target) and _isatty(sys.stdout)
        return cls(progress_enabled(setting, rank=rank, tty=tty, environ=environ), stream)

    def _file(self) -> IO[str]:
        return self.stream if self.stream is not None else terminal()

    def _bar(self, **kwargs: Any) -> tqdm:
        return tqdm(file=self._file(), leave=False, dynamic_ncols=True, mininterval=self.mininterval, **kwargs)

    @contextmanager
    def _cleared(self) -> Iterator[None]:
        if self._epochs is None and self._batches is None:
            yield
            return
        with tqdm.external_write_mode(file=self._file()):
            yield

    def wrap(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """Returns ``log`` made bar-safe: bars are cleared around each printed line."""
        if not self.enabled:
            return log

        def _log(line: str) -> None:
            with self._cleared():
                log(line)

        return _log

    def on_train_begin(self, trainer: Any) -> None:
        """Opens the epoch bar."""
        if self.enabled:
            self._epochs = self._bar(total=trainer.epochs, desc="epochs", unit="epoch", position=0)

    def on_epoch_begin(self, trainer: Any) -> None:
        """Opens this epoch's mini-batch bar."""
        if self.enabled:
            self._batches = self._bar(total=trainer.shape.train_iters, desc=f"epoch {trainer.epoch}",
                                      unit="batch", position=1)

    def on_batch_end(self, trainer: Any) -> None:
        """Advances the mini-batch bar and shows the mini-batch loss; closes it after the last batch."""
        if self._batches is not None:
            if trainer.loss is not None:
                self._batches.set_postfix(loss=f"{trainer.loss.item():.4g}", refresh=False)
            self._batches.update(1)
            if self._batches.total is not None and self._batches.n >= self._batches.total:
                # Gone before the epoch-end lines print, so only the epoch bar redraws around them.
                self._batches.close()
                self._batches = None

    def on_epoch_end(self, trainer: Any) -> None:
        """Closes the mini-batch bar and advances the epoch bar."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None
        if self._epochs is not None:
            task = trainer.task
            self._epochs.set_postfix({"objective": f"{trainer.stats.train_loss:.4g}",
                                      task.metric_key: task.metric_value(trainer.stats.train_accuracy, 4)},
                                     refresh=False)
            self._epochs.update(1)

    def on_train_end(self, trainer: Any) -> None:
        """Closes the epoch bar before the final test prints its lines."""
        if self._epochs is not None:
            self._epochs.close()
            self._epochs = None
