"""The emulated multi-node SLURM's parts: its conf, hosts file, and the CLI's start/stop leaving nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cluster import netns
from launcher.cluster.slurm_cluster import cluster_tag
from launcher.cluster.slurm_conf import SlurmPaths, render_cluster_conf
from launcher.cluster.slurm_daemons import missing_programs

ROOT = Path(__file__).resolve().parent.parent.parent


def test_cluster_conf_gives_each_node_its_address_spool_and_log():
    text = render_cluster_conf(SlurmPaths(Path("/r")), "controller", [("node1", "10.250.0.11"), ("node2", "10.250.0.12")],
                               7001, 7002, cpus=2, real_memory_mb=500)
    lines = text.splitlines()
    assert "SlurmctldHost=controller(127.0.0.1)" in lines
    assert "SlurmdSpoolDir=/r/spool/%n" in lines and "SlurmdLogFile=/r/log/slurmd-%n.log" in lines
    assert "NodeName=node2 NodeAddr=10.250.0.12 NodeHostname=node2 CPUs=2 RealMemory=500 State=UNKNOWN" in lines
    assert "PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP" in lines
    assert "SlurmdTimeout=10" in lines and not any("cred_expire" in line for line in lines)
    shared = render_cluster_conf(SlurmPaths(Path("/r")), "c", [("node1", "a")], 1, 2, spool_per_node=False,
                                 cred_expire_s=5)
    assert "SlurmdSpoolDir=/r/spool" in shared.splitlines()
    assert "AuthInfo=socket=/r/run/munge.sock,cred_expire=5" in shared.splitlines()


def test_hosts_name_every_address_in_both_forms_and_namespaces_carry_the_tag():
    controller, login, nodes = netns.plan_hosts("kfacabc123", 2)
    assert [h.name for h in (controller, login, *nodes)] == ["controller", "login", "node1", "node2"]
    assert all(h.netns.startswith("kfacabc123-") for h in (controller, login, *nodes))
    assert len({h.address for h in (controller, login, *nodes)}) == 4
    text = netns.hosts_file_text([controller, *nodes])
    assert f"{nodes[1].address} node2\n" in text and f"::ffff:{nodes[1].address} node2\n" in text
    assert cluster_tag(Path("/a")) != cluster_tag(Path("/b"))
    argv = netns.node_argv(nodes[0], Path("/r/hosts"), ["slurmd", "-D"])
    assert argv[:2] == ["nsenter", f"--net=/run/netns/{nodes[0].netns}"]  # not `ip netns exec`: it hides cgroups
    assert argv[-2:] == ["slurmd", "-D"] and "--uts" in argv and "--ipc" in argv


reason = ", ".join(missing_programs()) and "needs SLURM (.ci/install-slurm)"
reason = reason or netns.unsupported_reason()


@pytest.mark.skipif(bool(reason), reason=reason or "")
def test_the_cli_starts_two_nodes_kills_one_and_stop_leaves_nothing(tmp_path):
    root = Path("/tmp") / f"kfac-cli-test-{os.getpid()}"  # /tmp: munged needs x on every folder above its socket

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launcher.slurm_local", "--root", str(root), *args],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)

    started = cli("start", "--nodes", "2")
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout == f"export SLURM_CONF={root}/slurm.conf\n"
        env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
        sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env, timeout=30)
        assert sinfo.stdout.split() == ["node1", "idle", "node2", "idle"]
        # An allocation that must wait: slurmctld tells salloc later, at the address it came from.
        busy = subprocess.run(["sbatch", "--nodes=2", "--ntasks-per-node=4", "--output=/dev/null", "--wrap", "sleep 3"],
                              capture_output=True, text=True, env=env, timeout=30)
        assert busy.returncode == 0, busy.stderr
        waited = cli("login", "--", "salloc", "--nodes", "2", "--ntasks-per-node", "1", "srun", "hostname")
        assert waited.returncode == 0 and "queued and waiting for resources" in waited.stderr, waited.stderr
        assert sorted(waited.stdout.split()) == ["node1", "node2"]
        tag = cluster_tag(root.resolve())
        assert netns.namespace_pids(f"{tag}-node2")  # node2's slurmd
        assert cli("kill-node", "node2").returncode == 0
        assert netns.namespace_pids(f"{tag}-node2") == []
        assert cli("start-node", "node2").returncode == 0
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not [n for n in os.listdir(netns.NETNS_DIR) if n.startswith(tag)] if netns.NETNS_DIR.exists() else True
    leftovers = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], "processes of the cluster are still running"
    subprocess.run(["rm", "-rf", str(root)], check=True)
