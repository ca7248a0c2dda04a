"""Emulated cluster nodes on one Linux machine: named network namespaces on a private bridge.

Each node is a network namespace (``ip netns add``) with one interface on a bridge that lives
in the controller's namespace; a process enters a node through ``node_argv`` (its network
namespace, plus a UTS namespace for the node's host name, an IPC namespace, and a private mount
namespace in which the cluster's hosts file is bound over /etc/hosts). The IPC namespace makes
the nodes distinct machines to MPI too: UCX otherwise takes ranks on the same kernel (same boot
id, same IPC namespace) for neighbours and joins them by shared memory across "nodes". The machine's own network, host name
and /etc/hosts are never changed: every address lives only inside namespaces made here.

``nsenter --net`` is used rather than ``ip netns exec``: the latter remounts /sys, which hides
/sys/fs/cgroup, and slurmd then refuses to start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

NETNS_DIR = Path("/run/netns")
SUBNET = "10.250.0"  # a /24 that exists only on the bridge inside the controller's namespace


class NamespaceError(RuntimeError):
    """A namespace or link could not be made or removed; the message is one line."""


@dataclass(frozen=True)
class Host:
    """One emulated machine: its host name, its namespace's name and its address on the bridge."""

    name: str
    netns: str
    address: str

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def plan_hosts(tag: str, nodes: int) -> tuple[Host, Host, list[Host]]:
    """The controller, the login host and ``nodes`` compute nodes of the cluster ``tag``."""
    controller = Host("controller", f"{tag}-controller", f"{SUBNET}.1")
    login = Host("login", f"{tag}-login", f"{SUBNET}.2")
    compute = [Host(f"node{i}", f"{tag}-node{i}", f"{SUBNET}.{10 + i}") for i in range(1, nodes + 1)]
    return controller, login, compute


def hosts_file_text(hosts: Sequence[Host]) -> str:
    """The /etc/hosts every emulated machine sees: localhost and each host's bridge address.

    Each address also in its IPv4-mapped IPv6 form: servers listening on both families (gloo's
    and torch.distributed's TCP store) see their IPv4 clients so, and name them by reverse lookup.
    """
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    lines += [f"{h.address} {h.name}" for h in hosts]
    lines += [f"::ffff:{h.address} {h.name}" for h in hosts]
    return "\n".join(lines) + "\n"


RESOLV_CONF_TEXT = ("# The emulated cluster's machines have no name server: names come from its hosts file,\n"
                    "# and no lookup leaves the cluster's network.\noptions attempts:1 timeout:1\n")


def unsupported_reason() -> Optional[str]:
    """Why namespaces cannot be made here (``None``: they can)."""
    if os.geteuid() != 0:
        return "emulated nodes need root (network, UTS and mount namespaces)"
    for program in ("ip", "nsenter", "unshare"):
        if not any(os.access(os.path.join(d, program), os.X_OK)
                   for d in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin", "/usr/bin")):
            return f"emulated nodes need the {program!r} program"
    return None


def _ip(*args: str) -> None:
    ip = next((p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip") if os.access(p, os.X_OK)), "ip")
    result = subprocess.run([ip, *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {' '.join(result.stderr.split()) or 'failed'}")


def create_network(controller: Host, others: Sequence[Host]) -> list[str]:
    """Makes each host's namespace, the bridge in the controller's, and one link per other host.

    Returns:
        The names of the namespaces made, for ``remove_namespaces`` (also on failure half-way:
        the caller removes what the exception's ``made`` attribute lists).
    """
    made: list[str] = []
    try:
        for host in (controller, *others):
            if host.netns_path.exists():
                raise NamespaceError(f"network namespace {host.netns} already exists (a cluster of the same "
                                     "name runs, or was not stopped: python -m launcher.slurm_local stop)")
            _ip("netns", "add", host.netns)
            made.append(host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
        c = controller.netns
        _ip("-n", c, "link", "add", "br0", "type", "bridge")
        _ip("-n", c, "addr", "add", f"{controller.address}/24", "dev", "br0")
        _ip("-n", c, "link", "set", "br0", "up")
        for i, host in enumerate(others):
            port = f"port{i}"
            _ip("-n", c, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("-n", c, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
    except NamespaceError as err:
        err.made = made  # type: ignore[attr-defined]
        raise
    return made


def set_link(host: Host, up: bool) -> None:
    """Takes a host's only link down (a cut cable) or up again."""
    _ip("-n", host.netns, "link", "set", "eth0", "up" if up else "down")


def remove_namespaces(names: Sequence[str]) -> None:
    """Kills what still runs in each namespace, then deletes it (the links inside go with it)."""
    for name in names:
        kill_namespace(name)
        if (NETNS_DIR / name).exists():
            _ip("netns", "del", name)


def namespace_pids(name: str) -> list[int]:
    """The processes whose network namespace is the named one (threads of others are not counted)."""
    try:
        target = os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def kill_namespace(name: str, timeout_s: float = 10.0) -> list[int]:
    """SIGKILLs every process in the named network namespace (a node losing power); returns their pids."""
    killed = namespace_pids(name)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while namespace_pids(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def node_argv(host: Host, hosts_file: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` run as if on ``host``: its network, its host name, the cluster's /etc/hosts (and
    the ``resolv.conf`` beside it, with no name server, over /etc/resolv.conf).

    The pid of the process started from this argv is that of ``argv[0]`` itself (each wrapper
    execs the next), so it can be signalled as the daemon it is.
    """
    resolv_conf = hosts_file.with_name("resolv.conf")
    script = ('hostname "$0" && mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf '
              '&& shift 2 && exec "$@"')
    return ["nsenter", f"--net={host.netns_path}", "--", "unshare", "--uts", "--ipc", "--mount", "--propagation", "private",
            "--", "/bin/sh", "-c", script, host.name, str(hosts_file), str(resolv_conf), *argv]
