"""An address of this host that ranks on other nodes can reach (for gloo's and NCCL's rendezvous).

``gethostbyname(gethostname())`` is not enough on its own: many distributions map the host
name to a loopback address (Debian writes ``127.0.1.1 <hostname>`` into /etc/hosts), and a
rendezvous on a loopback address is unreachable from the other nodes.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from typing import Optional

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def _usable(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified)


def name_addresses(hostname: str) -> list[str]:
    """The IPv4 addresses the resolver gives for ``hostname`` (hosts file, DNS), in its order."""
    try:
        infos = socket.getaddrinfo(hostname, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


def interface_addresses() -> dict[str, str]:
    """``{interface: IPv4 address}`` of this host's interfaces that have one (Linux)."""
    found: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # down, or no IPv4 address
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def reachable_address(hostname: Optional[str] = None) -> str:
    """This host's address for other nodes: its name's, unless that is loopback; else an interface's.

    Raises:
        RuntimeError: The host has no address but loopback ones (a one-line message).
    """
    hostname = hostname or socket.gethostname()
    for address in name_addresses(hostname):
        if _usable(address):
            return address
    for address in interface_addresses().values():
        if _usable(address):
            return address
    raise RuntimeError(f"host {hostname} has no address but loopback ones: ranks on other nodes cannot "
                       "reach it (set MASTER_ADDR to an address they can reach)")
