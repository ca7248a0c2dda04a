"""Where the ranks run: each rank's host and local rank, gathered once at start-up.

Rank 0 prints one line per rank (``rank R/W: host H, local rank L``) so every log shows the
job's placement; the step watchdog (``trainer.ranks.watchdog``) names a lost rank's host from it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

NAME_BYTES = 64  # a host name is cut to this many bytes for the exchange


@dataclass(frozen=True)
class Placement:
    """One rank's place: its host's name and its index among the ranks on that host."""

    host: str
    local_rank: int


def gather_placements(comm, local_rank: int, host: str | None = None) -> list[Placement]:
    """Every rank's ``Placement``, in rank order, on every rank (one collective).

    Each rank writes its own row of a zero table and the sum over ranks fills every row: the
    communicators offer sums and broadcasts only, and this is the one exchange of strings.
    """
    host = host or socket.gethostname()
    table = torch.zeros(comm.world_size, NAME_BYTES + 1, dtype=torch.float64)
    encoded = host.encode()[:NAME_BYTES]
    table[comm.rank, :len(encoded)] = torch.tensor(list(encoded), dtype=torch.float64)
    table[comm.rank, NAME_BYTES] = local_rank
    if comm.world_size > 1:
        comm.allreduce_sum_([table])
    rows = table.to(torch.int64).tolist()
    return [Placement(bytes(b for b in row[:NAME_BYTES] if b).decode(errors="replace"), row[NAME_BYTES])
            for row in rows]


def placement_lines(placements: list[Placement]) -> list[str]:
    """``rank R/W: host H, local rank L``, one line per rank."""
    world = len(placements)
    return [f"rank {r}/{world}: host {p.host}, local rank {p.local_rank}" for r, p in enumerate(placements)]


def ranks_by_host(ranks: list[int], placements: list[Placement]) -> str:
    """``2, 3 (node2)``: ranks grouped by their host, for a message."""
    groups: dict[str, list[int]] = {}
    for r in ranks:
        groups.setdefault(placements[r].host if r < len(placements) else "?", []).append(r)
    return "; ".join(f"{', '.join(map(str, rs))} ({host})" for host, rs in groups.items())
