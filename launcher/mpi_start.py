"""MPI_Init first, with a deadline: how every rank of an MPI job starts (``kfac.py`` calls it).

A rank initialises MPI before it imports anything else, for two reasons: the MPI launchers end
a job for a rank that exits only once that rank has joined MPI (a rank with bad input must end
the whole job, not leave the others waiting), and the start-up exchange then runs in a small,
fresh process.

MPI_Init can hang: a PMI server that never answers (two nodes sharing one SLURM spool folder
share the socket slurmstepd's PMI-2 plugin makes there) leaves every rank waiting in it, and
MPI_Init holds Python's lock, so no thread of this process can act. A separate watcher process
does: if MPI_Init has not returned within the deadline (``$KFAC_START_TIMEOUT_S``, default
300 s), it prints one line and kills this rank, and the launcher (srun ``--kill-on-bad-exit``,
mpiexec) ends the job. Ranks other than 0 wait a few seconds longer, so a job whose ranks all
hang gets one line, rank 0's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

TIMEOUT_ENV = "KFAC_START_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
OTHER_RANKS_GRACE_S = 5.0

# The watcher: waits for its stdin to close (MPI_Init returned); on timeout, one line and SIGKILL.
_WATCHER = """
import os, select, signal, sys
pid, timeout, what = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], timeout)
if not ready:
    print(f"kfac.py: error: {what}: MPI_Init did not return in {timeout:g} s (the PMI server never "
          "answered); the job ends", file=sys.stderr, flush=True)
    os.kill(pid, signal.SIGKILL)
"""


def start_timeout_s(environ: dict[str, str] | os._Environ[str]) -> float:
    """The start-up deadline in seconds (``$KFAC_START_TIMEOUT_S``; 0 or less: none)."""
    try:
        return float(environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def init_mpi(rank: int, world_size: int, timeout_s: float) -> bool:
    """Initialises MPI (mpi4py) under a deadline; False where mpi4py is not installed."""
    watcher = None
    if timeout_s > 0:
        what = f"rank {rank}/{world_size} on {socket.gethostname()}"
        timeout_s += OTHER_RANKS_GRACE_S if rank else 0.0
        watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid()), str(timeout_s), what],
                                   stdin=subprocess.PIPE)
    try:
        from mpi4py import MPI  # noqa: F401  (the import is MPI_Init)
    except ImportError:
        return False
    finally:
        if watcher is not None:
            watcher.stdin.close()  # type: ignore[union-attr]
            watcher.wait()
    return True
