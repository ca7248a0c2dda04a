"""A private SLURM on 127.0.0.1 for tests: munged, slurmctld and slurmd, all under one folder.

(``python -m launcher.slurm_local`` is its command line, for emulated nodes too.)

Nothing of the machine's own SLURM or munge is used or touched: the daemons get their own
slurm.conf, munge key and socket, state, spool and log dirs, and free ports. They must run as
root (slurmd starts jobs as their users) and need Debian's ``slurmctld slurmd slurm-client munge``
(``.ci/install-slurm``)::

    with LocalSlurm() as slurm:          # SLURM_CONF is exported while inside
        job_id = launcher.batch.submit(work_dir)
        slurm.wait_for_job(job_id)

Daemons are stopped by the pids this module started (checked against /proc first), never by name.
The pure part (the folders, slurm.conf, the daemons' argv) lives in ``launcher.cluster.slurm_conf``;
this module is the I/O.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional

from launcher.cluster.slurm_conf import DAEMONS, SlurmPaths, daemon_argvs, render_slurm_conf

CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scontrol")
FINISHED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                             "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


class LocalSlurmError(RuntimeError):
    """The local SLURM could not be started, stopped or asked; the message carries the daemons' logs."""


def find_binary(name: str) -> Optional[str]:
    """A SLURM or munge program on PATH or in the sbin folders (often not on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_programs() -> list[str]:
    """The daemons and clients a local SLURM needs that this machine lacks (empty: all there)."""
    return [name for name in (*DAEMONS, *CLIENTS) if find_binary(name) is None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent's wait is missing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty)"


class LocalSlurm:
    """A private one-node SLURM: ``start()``/``stop()``, or a context manager that exports SLURM_CONF.

    Building one does nothing; ``start`` makes the folders (a fresh temp dir when ``root`` is ``None``,
    removed again by ``stop``) and starts the daemons.

    Args:
        root: The folder for conf, key, state and logs; ``None`` for a fresh temp dir.
        cpus: CPUs the node claims.
        real_memory_mb: Memory the node claims, in MB.
        timeout_s: How long ``start`` waits for the node to be idle.
    """

    def __init__(self, root: Optional[str | os.PathLike[str]] = None, *, cpus: int = 4,
                 real_memory_mb: int = 1000, timeout_s: float = 30.0) -> None:
        self._root = Path(root) if root is not None else None
        self.cpus = cpus
        self.real_memory_mb = real_memory_mb
        self.timeout_s = timeout_s
        self.paths: Optional[SlurmPaths] = None
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._made_root = False
        self._saved_conf: Optional[str] = None

    # --- lifecycle ---

    def start(self) -> LocalSlurm:
        """Writes the conf and key, starts munged, slurmctld and slurmd, and waits until the node is idle.

        Raises:
            LocalSlurmError: If a program is missing, this is not root, or the node is not idle in time
                (the daemons are stopped again and their logs are in the message).
        """
        self._prepare()
        try:
            self._configure_and_spawn()
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare(self) -> None:
        """Checks the machine and makes the cluster's folders (a fresh state and spool)."""
        missing = missing_programs()
        if missing:
            raise LocalSlurmError(f"cannot start a local SLURM: missing {', '.join(missing)} (run .ci/install-slurm)")
        if os.geteuid() != 0:
            raise LocalSlurmError("cannot start a local SLURM: slurmd must run as root")
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="kfac-slurm-"))
            self._made_root = True
        paths = self.paths = SlurmPaths(self._root.resolve())
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.root.chmod(0o755)
        for folder in (paths.state, paths.spool):  # a fresh cluster: no jobs or nodes of an earlier one
            shutil.rmtree(folder, ignore_errors=True)
        for folder, mode in ((paths.run, 0o755), (paths.munge_dir, 0o700), (paths.state, 0o755),
                             (paths.spool, 0o755), (paths.log, 0o755)):
            folder.mkdir(exist_ok=True)
            folder.chmod(mode)
        if not paths.munge_key.exists():
            fd = os.open(paths.munge_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))

    def _configure_and_spawn(self) -> None:
        """One node, this machine, on 127.0.0.1: the conf, then munged, slurmctld and slurmd."""
        paths = self.paths
        assert paths is not None
        hostname = socket.gethostname().split(".")[0]
        paths.conf.write_text(render_slurm_conf(paths, hostname, free_port(), free_port(),
                                                cpus=self.cpus, real_memory_mb=self.real_memory_mb))
        binaries = {name: find_binary(name) or name for name in DAEMONS}
        for name, argv in daemon_argvs(paths, binaries, hostname).items():
            self._spawn(name, argv)
            if name == "munged":
                self._wait(lambda: paths.munge_socket.exists(), "munged's socket")
        self._wait(lambda: self.node_state() == "idle", f"node {hostname} to be idle")

    def _spawn_munged(self) -> None:
        assert self.paths is not None
        binaries = {name: find_binary(name) or name for name in DAEMONS}
        self._spawn("munged", daemon_argvs(self.paths, binaries, "")["munged"])
        self._wait(lambda: self.paths.munge_socket.exists(), "munged's socket")

    def _spawn(self, name: str, argv: list[str], stdout: Optional[Path] = None) -> None:
        assert self.paths is not None
        with open(self.paths.log / f"{name}.stderr", "ab") as log, open(stdout or os.devnull, "ab") as out:
            # A session of their own: a Ctrl-C meant for the tests does not reach them half-way.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out if stdout else log, stderr=log,
                                    env=self.env(), start_new_session=True)
        self._procs[name] = proc
        self.pids[name] = proc.pid
        self._save_pids()

    def _save_pids(self) -> None:
        assert self.paths is not None
        self.paths.pids.write_text(json.dumps(self.pids) + "\n")

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            dead = [name for name, proc in self._procs.items() if proc.poll() is not None]
            if dead:
                raise LocalSlurmError(f"local SLURM: {', '.join(dead)} exited while waiting for {what}\n"
                                      + self.logs())
            if ready():
                return
            time.sleep(0.2)
        raise LocalSlurmError(f"local SLURM: gave up after {self.timeout_s:.0f} s waiting for {what} "
                              f"(node state {self.node_state()!r})\n" + self.logs())

    def stop(self) -> None:
        """Stops every daemon this object started, by pid (slurmd first), and removes a temp root."""
        stop_pids(self.pids, self._procs)
        self._procs.clear()
        self.pids.clear()
        if self.paths is not None:
            self.paths.pids.unlink(missing_ok=True)
        if self._made_root and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._made_root = False

    def __enter__(self) -> LocalSlurm:
        self.start()
        assert self.paths is not None
        self._saved_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.paths.conf)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._saved_conf
        self.stop()

    # --- asking the cluster ---

    def env(self) -> dict[str, str]:
        """``os.environ`` with this cluster's ``SLURM_CONF``: the environment for its clients."""
        assert self.paths is not None, "start() first"
        return dict(os.environ, SLURM_CONF=str(self.paths.conf))

    def node_state(self) -> str:
        """The node's state as sinfo prints it (``idle``, ``alloc``, ``unk*`` ...); ``""`` if unknown."""
        result = subprocess.run([find_binary("sinfo") or "sinfo", "-h", "-N", "-o", "%t"], env=self.env(),
                                capture_output=True, text=True, timeout=10)
        return result.stdout.strip() if result.returncode == 0 else ""

    def job_state(self, job_id: str) -> str:
        """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED`` ...) from ``scontrol show job``."""
        result = subprocess.run([find_binary("scontrol") or "scontrol", "show", "job", "-o", job_id],
                                env=self.env(), capture_output=True, text=True, timeout=10)
        match = re.search(r"\bJobState=(\S+)", result.stdout)
        if result.returncode != 0 or match is None:
            raise LocalSlurmError(f"scontrol knows no job {job_id}: {' '.join(result.stderr.split())}")
        return match.group(1)

    def wait_for_job(self, job_id: str, timeout_s: float = 60.0) -> str:
        """Waits until the job has finished and returns its final state (``COMPLETED`` when it succeeded).

        Raises:
            LocalSlurmError: If it has not finished within ``timeout_s`` (the job is cancelled).
        """
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in FINISHED_STATES:
                return state
            time.sleep(0.3)
        subprocess.run([find_binary("scancel") or "scancel", job_id], env=self.env(), capture_output=True, timeout=10)
        raise LocalSlurmError(f"job {job_id} still {state} after {timeout_s:.0f} s; cancelled\n" + self.logs())

    def logs(self) -> str:
        """The last lines of each daemon's log, for error messages."""
        assert self.paths is not None
        parts = []
        for path in sorted(self.paths.log.iterdir()):
            parts.append(f"--- {path} ---\n{_tail(path)}")
        return "\n".join(parts)


def stop_pids(pids: Mapping[str, int], procs: Optional[Mapping[str, subprocess.Popen[bytes]]] = None,
              marker: str = "", timeout_s: float = 15.0) -> None:
    """SIGTERM each daemon (slurmd, slurmctld, munged), then SIGKILL what is left after ``timeout_s``.

    A pid is signalled only while it is alive; one that is not our child is first checked against
    /proc/<pid>/cmdline so a reused pid of some other program is never touched.

    Args:
        pids: Daemon name to pid.
        procs: Daemon name to its Popen, where this process started it (so it is reaped).
        marker: Text the command line of a daemon that is not our child must hold (its cluster's root).
        timeout_s: How long each daemon gets to exit after SIGTERM.
    """
    procs = procs or {}
    rank = {name: i for i, name in enumerate(reversed(DAEMONS))}  # slurmd first, munged last
    for name in sorted(pids, key=lambda n: rank.get(n.split("@")[0], -1)):
        pid = pids[name]
        proc = procs.get(name)
        if proc is None and not (name.split("@")[0] in command_line(pid) and marker in command_line(pid)):
            continue  # gone, and the pid now belongs to something else (or nothing)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc is not None:
                if proc.poll() is not None:
                    break
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=timeout_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                if not _alive(pid):
                    break
                os.kill(pid, sig)
                deadline = time.monotonic() + timeout_s
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not _alive(pid):
                    break
