"""Which peers' nodes this rank can still reach over the network (docs/faults.md: a cut link).

A node whose network link is cut keeps its processes, and on many clusters its heartbeats (the
file system may not share the link), so the watchdog's counts do not name it. Each rank of a
job on several nodes therefore listens on a TCP port of its node's address and publishes
``address port`` in the heartbeat dir; when the watchdog reports, it tries to connect to one
rank per other node. A connection needs only the peer's kernel (the listening socket's backlog),
not its busy Python: a node that does not answer within a second is unreachable.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from launcher.workdir import atomic_write_text
from trainer.ranks.placement import Placement

CONNECT_TIMEOUT_S = 1.0


class Reach:
    """This rank's listening socket and the probe of its peers' nodes.

    Args:
        directory: The heartbeat dir (shared by the job's ranks).
        rank: This rank.
        placements: Every rank's host.
    """

    def __init__(self, directory: Path, rank: int, placements: list[Placement]) -> None:
        self.directory, self.rank, self.placements = directory, rank, placements
        self._socket: Optional[socket.socket] = None

    def publish(self, address: str) -> None:
        """Listens on ``address`` (any free port) and writes where, for the peers."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((address, 0))
        sock.listen(64)
        self._socket = sock
        atomic_write_text(self.directory / f"addr-{self.rank}", f"{address} {sock.getsockname()[1]}\n")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _where(self, rank: int) -> Optional[tuple[str, int]]:
        try:
            address, port = (self.directory / f"addr-{rank}").read_text().split()
            return address, int(port)
        except (OSError, ValueError):
            return None

    def unreachable(self, ranks: list[int]) -> list[int]:
        """Those of ``ranks`` on a node (other than this rank's) that does not take a connection.

        One rank per node is tried, all at once; a rank that published no address is left out
        (its heartbeat says more).
        """
        here = self.placements[self.rank].host
        hosts: dict[str, int] = {}
        for r in ranks:
            if self.placements[r].host != here and self._where(r) is not None:
                hosts.setdefault(self.placements[r].host, r)
        if not hosts:
            return []
        with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
            answered = dict(zip(hosts, pool.map(self._answers, hosts.values()), strict=True))
        return [r for r in ranks if self.placements[r].host in answered and not answered[self.placements[r].host]]

    def _answers(self, rank: int) -> bool:
        where = self._where(rank)
        if where is None:
            return True
        try:
            with socket.create_connection(where, timeout=CONNECT_TIMEOUT_S):
                return True
        except OSError:
            return False
