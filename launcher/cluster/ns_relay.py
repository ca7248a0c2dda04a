"""A TCP relay from 127.0.0.1:PORT in several network namespaces to 127.0.0.1:PORT in another.

The emulated cluster's slurm.conf for the machine's own namespace (where users run ``sbatch``
and ``squeue``) names slurmctld at 127.0.0.1, an address that namespace has; this relay listens
there and carries every connection to slurmctld in the controller's namespace (it can listen in
several namespaces). Nothing is sent to any address but loopback ones.

Run by ``launcher.cluster.slurm_cluster``::

    python -m launcher.cluster.ns_relay --cluster ROOT --port P --to /run/netns/X-controller --listen self
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import sys
import threading
from typing import Optional

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(fd: int) -> None:
    """Moves the calling thread (only it) into the network namespace open as ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _carry(client: socket.socket, to_fd: int, port: int) -> None:
    enter_netns(to_fd)  # a new thread starts in its creator's namespace: the listener's
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _listen(listen_fd: Optional[int], to_fd: int, port: int, ready: threading.Event, errors: list[str]) -> None:
    try:
        if listen_fd is not None:
            enter_netns(listen_fd)
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(128)
    except OSError as err:
        errors.append(str(err))
        ready.set()
        return
    ready.set()
    while True:
        client, _ = server.accept()
        threading.Thread(target=_carry, args=(client, to_fd, port), daemon=True).start()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.cluster.ns_relay", description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="", help="the cluster's folder (names this relay for `stop`)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--to", required=True, help="the namespace file of the target (slurmctld's)")
    parser.add_argument("--listen", action="append", default=[],
                        help="a namespace file to listen in; 'self' for this process's own")
    args = parser.parse_args(argv)
    to_fd = os.open(args.to, os.O_RDONLY)
    threads = []
    errors: list[str] = []
    for path in args.listen:
        ready = threading.Event()
        fd = None if path == "self" else os.open(path, os.O_RDONLY)
        thread = threading.Thread(target=_listen, args=(fd, to_fd, args.port, ready, errors), daemon=True)
        thread.start()
        ready.wait()
        threads.append(thread)
    if errors:
        print(f"ns_relay: {'; '.join(errors)}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
