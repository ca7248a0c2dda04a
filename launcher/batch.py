"""A run's ``batch.sh`` (a plain bash script, or one with ``#SBATCH`` lines): render, write, run or submit.

Pure: ``format_time``, ``header_lines``, ``body_lines`` and ``render_batch_script``; they read
no clock, environment or file system of their own. The I/O lives in the thin functions at the
bottom: ``write_work_dir``, ``run_batch_script`` and ``submit``. What a work dir is (its name,
its files) lives in ``launcher.workdir``.

Both kinds of script run in the work dir (``--chdir`` for SLURM, a ``cd`` line for bash), so a
launch argv must name ``kfac.py`` by its absolute path.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional, TextIO

from launcher.config import requeue_without_slurm
from launcher.workdir import (
    CONFIG_NAME,
    ERR_LOG,
    OUT_LOG,
    PREEMPTED_FILE,
    SCRIPT_NAME,
    AppendLog,
    DiskFullError,
    atomic_write_text,
)

SCHEDULERS = ("slurm", "mpiexec")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SubmitError(RuntimeError):
    """``sbatch`` is missing or refused the script; the message is one line with sbatch's stderr."""


# --- the script ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BatchSpec:
    """Everything a batch script says; built by the caller, rendered without I/O.

    Attributes:
        scheduler: ``slurm`` (``#SBATCH`` header, submitted with sbatch) or ``mpiexec`` (plain bash).
        nodes: Nodes of the allocation.
        ntasks_per_node: Ranks per node.
        job_name: The job's name.
        work_dir: The run's work dir, an absolute path.
        launch_argv: The command that starts the ranks (``srun ...`` or ``mpiexec ...``).
        time_limit_minutes: The job's time limit; ``None`` for the partition's default.
        partition: SLURM partition, or ``None``.
        account: SLURM account, or ``None``.
        reservation: SLURM reservation, or ``None``.
        env: Variables the script exports before launching, in this order.
        signal: ``--signal`` for sbatch (``USR1@120``: USR1 two minutes before the time limit), or ``None``.
        requeue: SLURM only: after ranks stopped by a signal (they leave the ``preempted`` file),
            the script requeues its job, which then resumes from the work dir's newest checkpoint.
    """

    scheduler: str
    nodes: int
    ntasks_per_node: int
    job_name: str
    work_dir: str | os.PathLike[str]
    launch_argv: Sequence[str]
    time_limit_minutes: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    reservation: Optional[str] = None
    env: Mapping[str, str] = field(default_factory=dict)
    signal: Optional[str] = None
    requeue: bool = False

    def __post_init__(self) -> None:
        errors = []
        if requeue_without_slurm(self.requeue, self.scheduler):
            errors.append("requeue: needs the slurm scheduler")
        if self.scheduler not in SCHEDULERS:
            errors.append(f"scheduler: {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        for key in ("nodes", "ntasks_per_node"):
            if getattr(self, key) < 1:
                errors.append(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.time_limit_minutes is not None and self.time_limit_minutes < 1:
            errors.append(f"time_limit_minutes: must be >= 1, got {self.time_limit_minutes}")
        if not os.path.isabs(os.fspath(self.work_dir)):
            errors.append(f"work_dir: must be an absolute path, got {os.fspath(self.work_dir)!r}")
        if not self.launch_argv:
            errors.append("launch_argv: must not be empty")
        # sbatch reads an #SBATCH value up to the first blank, so it may not hold one.
        for key in ("job_name", "partition", "account", "reservation", "signal", "work_dir"):
            value = getattr(self, key)
            if self.scheduler == "slurm" and value is not None and (
                    not os.fspath(value) or re.search(r"\s", os.fspath(value))):
                errors.append(f"{key}: must be non-empty and without blanks, got {os.fspath(value)!r}")
        for name in self.env:
            if not _ENV_NAME.match(name):
                errors.append(f"env: {name!r} is not a shell variable name")
        if errors:
            raise ValueError("invalid batch spec: " + "; ".join(errors))


def format_time(minutes: int) -> str:
    """A time limit in SLURM's format: ``HH:MM:00``, or ``D-HH:MM:00`` from a day on.

    Args:
        minutes: The limit in minutes, at least 1.

    Returns:
        ``00:30:00`` for 30, ``1-01:00:00`` for 1500.

    Raises:
        ValueError: If ``minutes`` is below 1.
    """
    if minutes < 1:
        raise ValueError(f"a time limit must be >= 1 minute, got {minutes}")
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00" if days else f"{hours:02d}:{mins:02d}:00"


def header_lines(spec: BatchSpec) -> list[str]:
    """The ``#SBATCH`` lines of a SLURM script, in a fixed order; none for ``mpiexec``."""
    if spec.scheduler != "slurm":
        return []
    work_dir = os.fspath(spec.work_dir)
    options = [
        f"--nodes={spec.nodes}",
        f"--ntasks={spec.nodes * spec.ntasks_per_node}",
        f"--ntasks-per-node={spec.ntasks_per_node}",
    ]
    if spec.time_limit_minutes is not None:
        options.append(f"--time={format_time(spec.time_limit_minutes)}")
    options.append(f"--job-name={spec.job_name}")
    for key in ("partition", "account", "reservation"):
        if getattr(spec, key) is not None:
            options.append(f"--{key}={getattr(spec, key)}")
    options += [
        f"--output={os.path.join(work_dir, OUT_LOG)}",
        f"--error={os.path.join(work_dir, ERR_LOG)}",
        f"--chdir={work_dir}",
    ]
    if spec.signal is not None:
        options.append(f"--signal={spec.signal}")
    if spec.requeue:
        # A requeued job writes to the same logs: append rather than start them afresh.
        options += ["--requeue", "--open-mode=append"]
    else:
        # Otherwise SLURM's default may requeue a job whose node failed, and the job then waits,
        # pending, for that node: a failure should end it (the checkpoint lets a new job resume).
        options.append("--no-requeue")
    return [f"#SBATCH {option}" for option in options]


def body_lines(spec: BatchSpec) -> list[str]:
    """The commands of the script: exports, the launch, and its exit status passed on."""
    lines = []
    if spec.scheduler != "slurm":  # sbatch's --chdir does this for SLURM
        lines.append(f"cd {shlex.quote(os.fspath(spec.work_dir))} || exit 1")
    lines += [f"export {name}={shlex.quote(str(value))}" for name, value in spec.env.items()]
    lines += [
        'echo "Started at $(date)"',
        shlex.join(spec.launch_argv),
        "status=$?",
        'echo "Finished at $(date) with status $status"',
    ]
    if spec.requeue:
        lines += [
            f'if [ "$status" -eq 0 ] && [ -e {PREEMPTED_FILE} ] && [ -n "${{SLURM_JOB_ID:-}}" ]; then',
            '  echo "Stopped by a signal with a checkpoint: requeueing job $SLURM_JOB_ID"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    lines.append("exit $status")
    return lines


def render_batch_script(spec: BatchSpec) -> str:
    """The whole text of ``batch.sh``: shebang, ``#SBATCH`` lines (SLURM only), a blank line, the body."""
    return "\n".join(["#!/bin/bash", *header_lines(spec), "", *body_lines(spec)]) + "\n"


# --- I/O at the edge -------------------------------------------------------------------------------


def write_work_dir(work_dir: str | os.PathLike[str], script_text: str, config_yaml_text: str) -> None:
    """Makes the work dir (and its parents) and writes ``batch.sh`` (executable) and ``config.yaml``.

    Each file is written to a hidden temporary name and renamed, so a reader never sees half a file.

    Args:
        work_dir: The run's work dir, as returned by ``choose_work_dir``.
        script_text: ``render_batch_script(spec)``.
        config_yaml_text: The composed config as YAML.
    """
    path = Path(work_dir)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / CONFIG_NAME, config_yaml_text, mode=0o644)
    atomic_write_text(path / SCRIPT_NAME, script_text, mode=0o755)


def _tee(source: BinaryIO, log: AppendLog, terminal: TextIO) -> None:
    # Line by line, so the terminal and the log see each line as soon as the ranks print it.
    # A full disk stops the log (its lines stay whole), not the echo: said once, on the terminal.
    for line in iter(source.readline, b""):
        text = line.decode("utf-8", errors="replace")
        terminal.write(text)
        terminal.flush()
        try:
            log.write(text)
        except DiskFullError as err:
            terminal.write(f"kfac.py: error: {err}\n")
            terminal.flush()


@contextmanager
def _waiting_through_ctrl_c() -> Iterator[None]:
    """While inside, a Ctrl-C does not end this process: the script must end first.

    The terminal sends Ctrl-C's SIGINT to the whole foreground group: the script's mpiexec
    passes it on to every rank once, and the ranks checkpoint and stop at the end of their step
    (trainer/ranks/signals.py); a second Ctrl-C makes mpiexec end the ranks at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []

    def note(signum: int, frame: object) -> None:
        if not pressed:
            print("Ctrl-C: the ranks stop with a checkpoint at the end of this step (Ctrl-C again to quit now)",
                  file=sys.stderr, flush=True)
        pressed.append(signum)

    saved = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


def run_batch_script(work_dir: str | os.PathLike[str], *, stdout: Optional[TextIO] = None,
                     stderr: Optional[TextIO] = None) -> int:
    """Runs ``bash batch.sh`` in the work dir; its output goes to the terminal and to out.log / err.log.

    For the plain-bash (``mpiexec``) script; a SLURM script is given to ``submit`` instead.
    ``PYTHONUNBUFFERED=1`` is set for the script so Python ranks print line by line through the pipe.

    Args:
        work_dir: A work dir written by ``write_work_dir``.
        stdout: Where the script's stdout is echoed; ``sys.stdout`` (looked up at call time) if ``None``.
        stderr: Where its stderr is echoed; ``sys.stderr`` if ``None``.

    Returns:
        The script's exit status (128 + N when a signal N ended it, as a shell reports it).
    """
    path = Path(work_dir)
    out_terminal = stdout if stdout is not None else sys.stdout
    err_terminal = stderr if stderr is not None else sys.stderr
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with closing(AppendLog(path / OUT_LOG)) as out_log, closing(AppendLog(path / ERR_LOG)) as err_log:
        # In this process's group, so that what ends the group (a Ctrl-C, a kill of the job) ends the script too.
        proc = subprocess.Popen(["bash", SCRIPT_NAME], cwd=path, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        threads = [threading.Thread(target=_tee, args=(proc.stdout, out_log, out_terminal), daemon=True),
                   threading.Thread(target=_tee, args=(proc.stderr, err_log, err_terminal), daemon=True)]
        for thread in threads:
            thread.start()
        try:
            with _waiting_through_ctrl_c():
                returncode = proc.wait()
        except BaseException:  # never leave the script behind
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        finally:
            for thread in threads:
                thread.join()
            proc.stdout.close()
            proc.stderr.close()
    return 128 - returncode if returncode < 0 else returncode


def submit(work_dir: str | os.PathLike[str], *, env: Optional[Mapping[str, str]] = None) -> str:
    """Submits the work dir's ``batch.sh`` with ``sbatch --parsable`` and returns the job id.

    Args:
        work_dir: A work dir written by ``write_work_dir`` from a SLURM spec.
        env: The environment for sbatch (which passes it on to the job); ``os.environ`` if ``None``.

    Returns:
        The job id, for example ``"1234"``.

    Raises:
        SubmitError: If sbatch is not on PATH, fails, or prints no job id.
    """
    script = os.path.join(os.fspath(work_dir), SCRIPT_NAME)
    environ = dict(os.environ if env is None else env)
    sbatch = shutil.which("sbatch", path=environ.get("PATH"))
    if sbatch is None:
        raise SubmitError(f"cannot submit {script}: sbatch is not on PATH (is this a SLURM login node?); "
                          "--setup-only writes the script without submitting it")
    try:
        result = subprocess.run([sbatch, "--parsable", SCRIPT_NAME], cwd=work_dir, env=environ,
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SubmitError(f"sbatch failed for {script}: {e}") from e
    stderr = " ".join(result.stderr.split())
    if result.returncode != 0:
        raise SubmitError(f"sbatch failed for {script} (exit {result.returncode}): {stderr or 'no message'}")
    # --parsable prints "<id>" or "<id>;<cluster>".
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed no job id for {script}: {result.stdout.strip()!r} {stderr}")
    return job_id
