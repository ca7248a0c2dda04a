"""The pure part of the private SLURM of ``launcher.cluster.slurm_daemons``: its folders, slurm.conf, daemon argv.

Nothing here reads or writes a file or starts a process; ``launcher.cluster.slurm_daemons`` and
``launcher.cluster.slurm_cluster`` do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


@dataclass(frozen=True)
class SlurmPaths:
    """Where everything of one local SLURM lives, all below ``root``."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def pids(self) -> Path:
        return self.root / "pids.json"

    @property
    def run(self) -> Path:
        return self.root / "run"  # open to all: munge clients need x on the socket's folders

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"  # private: munged refuses a key others can read

    @property
    def munge_key(self) -> Path:
        return self.munge_dir / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.run / "munge.sock"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def log(self) -> Path:
        return self.root / "log"


def _common_lines(paths: SlurmPaths, cluster_name: str, ctld_host: str, ctld_port: int, slurmd_port: int,
                  ctld_address: str = "127.0.0.1") -> list[str]:
    return [
        f"ClusterName={cluster_name}",
        f"SlurmctldHost={ctld_host}({ctld_address})",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={paths.munge_socket}",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        # The main scheduling pass every 2 s, not 60: a requeued job (whose start waits out its
        # credential) is started by that pass, and would otherwise idle most of a minute.
        "SchedulerParameters=sched_interval=2",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "KillWait=5",
        "MinJobAge=600",
        f"StateSaveLocation={paths.state}",
    ]


def render_slurm_conf(paths: SlurmPaths, hostname: str, ctld_port: int, slurmd_port: int, *,
                      cpus: int = 4, real_memory_mb: int = 1000, cluster_name: str = "kfactest") -> str:
    """The slurm.conf of a one-node cluster on 127.0.0.1.

    Args:
        paths: The cluster's folders.
        hostname: This machine's short host name (slurmctld insists on its own name).
        ctld_port: slurmctld's port.
        slurmd_port: slurmd's port.
        cpus: CPUs the node claims; ``config_overrides`` lets it claim more than it has.
        real_memory_mb: Memory the node claims, in MB.
        cluster_name: ``ClusterName``.

    Returns:
        The file's text.
    """
    lines = [
        "# A private one-node SLURM for tests, written by launcher.slurm_local.",
        *_common_lines(paths, cluster_name, hostname, ctld_port, slurmd_port),
        f"SlurmdSpoolDir={paths.spool}",
        f"SlurmctldPidFile={paths.run / 'slurmctld.pid'}",
        f"SlurmdPidFile={paths.run / 'slurmd.pid'}",
        f"SlurmctldLogFile={paths.log / 'slurmctld.log'}",
        f"SlurmdLogFile={paths.log / 'slurmd.log'}",
        f"NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_memory_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={hostname} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def render_cluster_conf(paths: SlurmPaths, controller: str, nodes: Sequence[tuple[str, str]], ctld_port: int,
                        slurmd_port: int, *, cpus: int = 4, real_memory_mb: int = 1000,
                        slurmd_timeout_s: int = 10, spool_per_node: bool = True, cred_expire_s: int = 120,
                        ctld_address: str = "127.0.0.1", cluster_name: str = "kfacnodes") -> str:
    """The slurm.conf of an emulated multi-node cluster (``launcher.cluster.netns``).

    Two copies differ in slurmctld's address only: the daemons and every client inside the
    cluster reach it at its bridge address (``ctld_address``), so it sees their real addresses and
    can answer them (salloc waits for a message that its allocation was granted); clients in the
    machine's own namespace reach it at 127.0.0.1, through a relay. Each node is reached at its
    own bridge address.
    Each node keeps its own spool, pid file and log (``%n``: the node's name): nodes sharing a
    spool folder would share the sockets slurmstepd makes there.

    Args:
        paths: The cluster's folders.
        controller: slurmctld's host name.
        nodes: ``(name, address)`` of each compute node.
        ctld_port: slurmctld's port.
        slurmd_port: every slurmd's port (each on its own address).
        cpus: CPUs each node claims.
        real_memory_mb: Memory each node claims, in MB.
        slurmd_timeout_s: How long a silent node stays up before slurmctld sets it DOWN and ends
            its jobs (SLURM's default, 300 s, is for real clusters; tests lose nodes on purpose).
        cred_expire_s: How long a job's launch credential lives; a requeued job waits that long
            before it starts again (SLURM's default: 120 s).
        spool_per_node: ``False`` gives every node the same spool folder: the misconfiguration
            that makes MPI_Init hang (for the test that shows a hung start-up ends).
        ctld_address: slurmctld's address in this copy.
        cluster_name: ``ClusterName``.
    """
    names = ",".join(name for name, _ in nodes)
    lines = [
        f"# An emulated {len(nodes)}-node SLURM on one machine, written by launcher.slurm_local.",
        *(f"{line},cred_expire={cred_expire_s}" if line.startswith("AuthInfo=") and cred_expire_s != 120 else line
          for line in _common_lines(paths, cluster_name, controller, ctld_port, slurmd_port, ctld_address)),
        f"SlurmdTimeout={slurmd_timeout_s}",
        "MessageTimeout=30",  # one machine carries the whole cluster: a busy one answers late
        f"SlurmdSpoolDir={paths.spool}/%n" if spool_per_node else f"SlurmdSpoolDir={paths.spool}",
        f"SlurmctldPidFile={paths.run / 'slurmctld.pid'}",
        f"SlurmdPidFile={paths.run / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={paths.log / 'slurmctld.log'}",
        f"SlurmdLogFile={paths.log / 'slurmd-%n.log'}",
        *(f"NodeName={name} NodeAddr={address} NodeHostname={name} CPUs={cpus} RealMemory={real_memory_mb} "
          "State=UNKNOWN" for name, address in nodes),
        f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def daemon_argvs(paths: SlurmPaths, binaries: Mapping[str, str], hostname: str) -> dict[str, list[str]]:
    """The argv of each daemon, in start order, each in the foreground (its pid is the one we keep)."""
    return {
        "munged": [binaries["munged"], "--foreground", f"--socket={paths.munge_socket}",
                   f"--key-file={paths.munge_key}", f"--pid-file={paths.run / 'munged.pid'}",
                   f"--seed-file={paths.munge_dir / 'munged.seed'}", f"--log-file={paths.log / 'munged.log'}"],
        "slurmctld": [binaries["slurmctld"], "-D", "-f", str(paths.conf)],
        "slurmd": [binaries["slurmd"], "-D", "-f", str(paths.conf), "-N", hostname],
    }
