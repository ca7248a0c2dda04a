"""``python -m launcher.slurm_local``: start and stop a private SLURM, one node or N emulated ones.

    eval "$(python -m launcher.slurm_local start)"            # this machine, on 127.0.0.1
    eval "$(python -m launcher.slurm_local start --nodes 2)"  # 2 nodes, each a network namespace
    python -m launcher.slurm_local login -- salloc --nodes 2 ...
    python -m launcher.slurm_local kill-node node2            # start-node node2 brings it back
    python -m launcher.slurm_local stop

``start`` prints the ``export SLURM_CONF=...`` line; the daemons outlive it, and ``stop`` finds
them by the pids in the cluster's folder (checked against their command lines) and removes the
namespaces. The daemons are ``launcher.cluster.slurm_daemons``; the nodes ``launcher.cluster.slurm_cluster``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from launcher.cluster import slurm_cluster
from launcher.cluster.slurm_conf import SlurmPaths
from launcher.cluster.slurm_daemons import LocalSlurm, LocalSlurmError, command_line, stop_pids


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m launcher.slurm_local start [--nodes N]|stop|kill-node NAME|start-node NAME|login [CMD...]``."""
    parser = argparse.ArgumentParser(prog="python -m launcher.slurm_local", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "kill-node", "start-node", "login"))
    parser.add_argument("args", nargs="*",
                        help="kill-node / start-node: the node's name; login: -- and the command (default: a shell)")
    parser.add_argument("--root", default=None,
                        help="the cluster's folder (default: <tmp>/kfac-local-slurm)")
    parser.add_argument("--nodes", type=int, default=0,
                        help="start: emulated compute nodes, each a network namespace (default 0: this machine)")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []  # login's command, options and all
    args = parser.parse_args(argv[:len(argv) - len(command) - 1] if "--" in argv else argv)
    root = Path(args.root or os.path.join(tempfile.gettempdir(), "kfac-local-slurm")).resolve()
    paths = SlurmPaths(root)
    pids = json.loads(paths.pids.read_text()) if paths.pids.exists() else {}
    if args.action == "stop":
        stop_pids(pids, marker=str(root))
        slurm_cluster.stop_namespaces(root)
        paths.pids.unlink(missing_ok=True)
        print(f"stopped the local SLURM in {root}", file=sys.stderr)
        return 0
    if args.action != "start":
        try:
            cluster = slurm_cluster.EmulatedCluster.attach(root)
            if args.action == "login":
                command = command or args.args or [os.environ.get("SHELL", "/bin/sh")]
                return subprocess.run(cluster.login_argv(command), env=cluster.env()).returncode
            if len(args.args) != 1:
                parser.error(f"{args.action} takes one node name")
            if args.action == "kill-node":
                killed = cluster.kill_node(args.args[0])
                print(f"killed {len(killed)} process(es) on {args.args[0]}", file=sys.stderr)
            else:
                cluster.start_node(args.args[0])
                print(f"{args.args[0]} is up", file=sys.stderr)
        except LocalSlurmError as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    running = [name for name, pid in pids.items()
               if name.split("@")[0] in command_line(pid) and str(root) in command_line(pid)]
    if running:
        print(f"a local SLURM already runs in {root} ({', '.join(running)}); stop it first", file=sys.stderr)
        return 1
    slurm = slurm_cluster.EmulatedCluster(args.nodes, root) if args.nodes > 0 else LocalSlurm(root)
    try:
        slurm.start()
    except LocalSlurmError as e:
        print(e, file=sys.stderr)
        return 1
    # The daemons outlive this process; `stop` finds them in pids.json (and the namespaces' names).
    print(f"export SLURM_CONF={paths.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
