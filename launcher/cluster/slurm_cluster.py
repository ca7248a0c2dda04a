"""An emulated multi-node SLURM on one machine: the private SLURM of ``launcher.cluster.slurm_daemons``,
with each compute node a Linux network namespace of its own (``launcher.cluster.netns``).

Debian's slurmctld, slurmd and munged run unchanged; only the machines are emulated. slurmctld
runs as the host ``controller`` (whose namespace holds the bridge), one slurmd runs inside each
node ``node1`` ... ``nodeN``, munged beside them (its socket is a file, so every namespace
reaches it), and ``launcher.cluster.ns_relay`` lets the machine's own namespace reach slurmctld at
127.0.0.1 (``slurm.conf``; inside the cluster, ``slurm-inside.conf`` names its bridge address). A
``login`` host sits on the bridge too: ``salloc`` runs there (``login_argv``), because the ranks'
nodes must reach ``srun`` at an address of their network. The nodes share the file system, as
a cluster's shared home does.

    with EmulatedCluster(nodes=2) as cluster:    # SLURM_CONF is exported while inside
        job_id = launcher.batch.submit(work_dir)
        cluster.wait_for_job(job_id)
        cluster.kill_node("node2")               # every process on it, SIGKILL

Start-up names and removes only what it made: namespaces ``<tag>-*`` (the tag is derived from
the cluster's folder), the links inside them, and daemons by pid.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from launcher.cluster import netns
from launcher.cluster.slurm_conf import SlurmPaths, render_cluster_conf
from launcher.cluster.slurm_daemons import LocalSlurm, LocalSlurmError, find_binary, free_port, stop_pids

RELAY = "relay"


def cluster_tag(root: Path) -> str:
    """The prefix of the cluster's namespace names, from its folder (so ``stop`` finds them again)."""
    return "kfac" + hashlib.sha1(str(root).encode()).hexdigest()[:6]


class EmulatedCluster(LocalSlurm):
    """``nodes`` emulated compute nodes under one private SLURM; see the module's docstring.

    Args:
        nodes: Compute nodes (at least 1).
        root, cpus, real_memory_mb, timeout_s: As ``LocalSlurm``'s (``cpus`` per node).
        slurmd_timeout_s: How long a silent node stays up before SLURM sets it DOWN.
        spool_per_node: ``False``: one spool folder for all nodes (a misconfiguration, for a test).
        cred_expire_s: Launch credentials' lifetime; a requeued job waits that long to restart.
    """

    def __init__(self, nodes: int = 2, root: Optional[str | os.PathLike[str]] = None, *, cpus: int = 4,
                 real_memory_mb: int = 1000, timeout_s: float = 60.0, slurmd_timeout_s: int = 10,
                 spool_per_node: bool = True, cred_expire_s: int = 120) -> None:
        if nodes < 1:
            raise ValueError(f"EmulatedCluster: nodes must be >= 1, got {nodes}")
        super().__init__(root, cpus=cpus, real_memory_mb=real_memory_mb, timeout_s=timeout_s)
        self.nodes = nodes
        self.slurmd_timeout_s = slurmd_timeout_s
        self.spool_per_node = spool_per_node
        self.cred_expire_s = cred_expire_s
        self.namespaces: list[str] = []
        self.controller: Optional[netns.Host] = None
        self.login: Optional[netns.Host] = None
        self.compute: list[netns.Host] = []

    @property
    def hosts_file(self) -> Path:
        assert self.paths is not None
        return self.paths.root / "hosts"

    def _prepare(self) -> None:
        """Checks the machine, then makes the root folder as ``LocalSlurm`` does."""
        reason = netns.unsupported_reason()
        if reason:
            raise LocalSlurmError(f"cannot start an emulated cluster: {reason}")
        super()._prepare()

    def _configure_and_spawn(self) -> None:
        paths = self.paths
        assert paths is not None
        self.controller, self.login, self.compute = netns.plan_hosts(cluster_tag(paths.root), self.nodes)
        try:
            self.namespaces = netns.create_network(self.controller, [self.login, *self.compute])
        except netns.NamespaceError as err:
            self.namespaces = list(getattr(err, "made", []))
            raise LocalSlurmError(str(err)) from None
        self._save_state()
        self.hosts_file.write_text(netns.hosts_file_text([self.controller, self.login, *self.compute]))
        self.hosts_file.chmod(0o644)
        self.hosts_file.with_name("resolv.conf").write_text(netns.RESOLV_CONF_TEXT)
        ctld_port, slurmd_port = free_port(), free_port()
        for conf, address in ((paths.conf, "127.0.0.1"), (self.inside_conf, self.controller.address)):
            conf.write_text(render_cluster_conf(
                paths, self.controller.name, [(h.name, h.address) for h in self.compute], ctld_port, slurmd_port,
                cpus=self.cpus, real_memory_mb=self.real_memory_mb, slurmd_timeout_s=self.slurmd_timeout_s,
                spool_per_node=self.spool_per_node, cred_expire_s=self.cred_expire_s, ctld_address=address))
        self._spawn_munged()
        relay_out = paths.log / "relay.stdout"
        relay_out.unlink(missing_ok=True)
        listen = ["--listen", "self"]  # inside the cluster, slurmd hands every job slurm-inside.conf
        self._spawn(RELAY, [sys.executable, "-m", "launcher.cluster.ns_relay", "--cluster", str(paths.root),
                            "--port", str(ctld_port), "--to", str(self.controller.netns_path), *listen], stdout=relay_out)
        self._wait(lambda: relay_out.exists() and "ready" in relay_out.read_text(), "the relay to listen")
        self._spawn("slurmctld", netns.node_argv(self.controller, self.hosts_file,
                                                 [find_binary("slurmctld") or "slurmctld", "-D", "-f", str(self.inside_conf)]))
        for host in self.compute:
            self.start_node(host.name, wait=False)
        self._wait(lambda: self._all_idle(), f"{self.nodes} node(s) to be idle")

    def _all_idle(self) -> bool:
        states = self.node_states()
        return len(states) == self.nodes and all(s == "idle" for s in states.values())

    def _save_state(self) -> None:
        assert self.paths is not None
        (self.paths.root / "namespaces.json").write_text(json.dumps(self.namespaces) + "\n")

    # --- the nodes ---

    def host(self, name: str) -> netns.Host:
        """The compute node, login host or controller called ``name``."""
        for host in (*self.compute, self.login, self.controller):
            if host is not None and host.name == name:
                return host
        raise LocalSlurmError(f"no host {name!r} in this cluster (nodes: {', '.join(h.name for h in self.compute)})")

    def node_states(self) -> dict[str, str]:
        """``{node: state}`` as sinfo prints them (``idle``, ``alloc``, ``down*`` ...)."""
        result = subprocess.run([find_binary("sinfo") or "sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(),
                                capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            return {}
        return dict(line.split(None, 1) for line in result.stdout.splitlines() if " " in line)

    def start_node(self, name: str, wait: bool = True) -> None:
        """Starts the node's slurmd (again, after ``kill_node``); waits until SLURM has it idle."""
        assert self.paths is not None
        host = self.host(name)
        (self.paths.spool / host.name).mkdir(parents=True, exist_ok=True)
        self._spawn(f"slurmd@{host.name}", netns.node_argv(
            host, self.hosts_file,
            [find_binary("slurmd") or "slurmd", "-D", "-f", str(self.inside_conf), "-N", host.name]))
        if wait:
            self._wait(lambda: self.node_states().get(host.name) == "idle", f"{host.name} to be idle")

    def kill_node(self, name: str) -> list[int]:
        """A node lost: SIGKILL for every process in its namespace (slurmd, slurmstepd, ranks)."""
        host = self.host(name)
        killed = netns.kill_namespace(host.netns)
        proc = self._procs.pop(f"slurmd@{host.name}", None)
        if proc is not None:
            proc.wait(timeout=10)
        self.pids.pop(f"slurmd@{host.name}", None)
        self._save_pids()
        return killed

    def cut_link(self, name: str, up: bool = False) -> None:
        """Takes the node's network link down (``up=True``: back up)."""
        netns.set_link(self.host(name), up)

    @property
    def inside_conf(self) -> Path:
        """The slurm.conf of the daemons and of clients inside the cluster (slurmctld at its own address)."""
        assert self.paths is not None
        return self.paths.root / "slurm-inside.conf"

    def login_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run on the login host (``salloc`` belongs there), with the cluster's inside conf."""
        assert self.login is not None, "start() first"
        return netns.node_argv(self.login, self.hosts_file, ["env", f"SLURM_CONF={self.inside_conf}", *argv])

    def stop(self) -> None:
        """Stops the daemons by pid (the slurmds first), then removes the namespaces (and what ran there)."""
        stop_pids(self.pids, self._procs, marker=str(self.paths.root) if self.paths else "")
        self._procs.clear()
        self.pids.clear()
        stop_namespaces(self.paths.root if self.paths else None, self.namespaces or None)
        self.namespaces = []
        super().stop()

    @classmethod
    def attach(cls, root: Path) -> EmulatedCluster:
        """The cluster running in ``root`` (started by another process), to kill or start its nodes."""
        state = root / "namespaces.json"
        if not state.exists():
            raise LocalSlurmError(f"no emulated cluster runs in {root} (no namespaces.json)")
        names = json.loads(state.read_text())
        nodes = sum(1 for n in names if n.rsplit("-", 1)[-1].startswith("node"))
        cluster = cls(nodes, root)
        cluster.paths = SlurmPaths(root)
        cluster.namespaces = names
        cluster.controller, cluster.login, cluster.compute = netns.plan_hosts(cluster_tag(root), nodes)
        pids_file = cluster.paths.pids
        cluster.pids = json.loads(pids_file.read_text()) if pids_file.exists() else {}
        return cluster


def _daemon(name: str) -> str:
    return name.split("@")[0]


def stop_namespaces(root: Optional[Path], names: Optional[list[str]] = None) -> None:
    """Removes the cluster's namespaces (from ``namespaces.json`` when ``names`` is not given)."""
    state = root / "namespaces.json" if root is not None else None
    if names is None:
        names = json.loads(state.read_text()) if state is not None and state.exists() else []
    tag = cluster_tag(root) if root is not None else ""
    netns.remove_namespaces([n for n in names if n.startswith(tag)])
    if state is not None:
        state.unlink(missing_ok=True)
