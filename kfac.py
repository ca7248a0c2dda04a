#!/usr/bin/env python3
"""Train LBANN's MNIST models, optionally with K-FAC.

    python3 kfac.py --model mlp --optimizer adam --optimizer-learning-rate 1e-4
    python3 kfac.py --model mlp --optimizer sgd --optimizer-learning-rate 1e-1 \
        --kfac --kfac-damping-act 0.01 --kfac-damping-err 1
    python3 kfac.py model=cnn optimizer=momentum optimizer.learning_rate=0.01   # Hydra overrides
    python3 kfac.py --help
    torchrun --nproc-per-node 2 kfac.py --nodes 1 --procs-per-node 2 --kfac   # ranks by torchrun

LBANN's flags become Hydra overrides (launcher/flags.py); Hydra composes configs/ onto the
schema (trainer/config.py); then this rank trains (trainer/run.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# ruff: noqa: E402 (the path above must be set before the project's imports)
from launcher.env import LAUNCHED, apply_thread_policy, rank_info
from launcher.mpi_start import init_mpi, start_timeout_s

apply_thread_policy()  # OpenMP's passive waits, read when torch loads: a shared CPU does not collapse


def join_mpi_first() -> None:
    """A rank of an MPI job (mpiexec, srun) joins MPI before anything else (launcher/mpi_start.py)."""
    if os.environ.get(LAUNCHED):
        info = rank_info(os.environ)
        if info.world_size > 1 and not info.torchrun:
            init_mpi(info.rank, info.world_size, start_timeout_s(os.environ))


join_mpi_first()

# Only the pure launcher modules and Hydra here: --help must not load torch. The schema, the
# checks that need the trainer and the training itself are imported where they are used.
import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launcher.compose import ComposeError, check_group_options, check_keys, compose_points
from launcher.config import LauncherConfig, config_groups, group_options
from launcher.env import inside_slurm_allocation, started_by_torchrun
from launcher.flags import FlagError, help_text, translate
from launcher.resumed import carried_overrides, override_key, saved_config_path
from launcher.workdir import ERR_LOG, DiskFullError, choose_work_dir


def register_schema() -> None:
    """Stores the dataclass schema (trainer/config.py) that ``configs/config.yaml`` composes onto."""
    from trainer.config import Config

    ConfigStore.instance().store(name="schema", node=Config)


# How long a rank other than 0 waits before it reports a problem itself: a problem of the
# config reaches every rank, and rank 0's one line (which ends the job) is enough. On a loaded
# machine rank 0 reached the same check more than 5 s after rank 1 (a clean-clone CI run).
RANK_GRACE_SECONDS = 15.0
DISK_FULL_STATUS = 4  # a write failed for lack of space: the run stopped, its checkpoints kept


def fail(message: str, status: int = 2, kind: str = "error") -> None:
    """Ends the program with one clear line; exit status 2 for bad input.

    In a job of several ranks the job gets one line, not one per rank: rank 0 reports and
    ends the job; another rank reports (naming itself) only if the job is still running after
    a grace period, which means the problem is its own (a node without a GPU, say). Ranks end
    with ``os._exit``: the launcher then stops the others without MPI_Abort's banner.
    """
    info = rank_info(os.environ) if os.environ.get(LAUNCHED) or started_by_torchrun(os.environ) else None
    if info is None or info.world_size == 1:
        print(f"kfac.py: {kind}: {message}", file=sys.stderr)
        sys.exit(status)
    # An MPI rank joined MPI at start-up (join_mpi_first), so its exit ends the job.
    if info.rank != 0:
        if kind != "interrupted":
            time.sleep(RANK_GRACE_SECONDS)
        message = f"rank {info.rank}/{info.world_size} on {socket.gethostname()}: {message}"
    if info.rank == 0 or kind != "interrupted":
        print(f"kfac.py: {kind}: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def precompose(overrides: list[str], config_dirs: list[str] = (), multirun: bool = False) -> None:
    """Composes the config once before Hydra runs, so bad input is one line, not a traceback
    (``launcher/compose.py``), then validates every composed point and checks this machine."""
    from trainer.config import Config, validate

    try:
        check_group_options(overrides, list(config_dirs))
        check_keys(overrides, list(config_dirs), OmegaConf.structured(Config))
        configs = compose_points(overrides, list(config_dirs), multirun)
    except ComposeError as err:
        fail(str(err))
    for cfg in configs:
        errors = validate(cfg)
        if errors:
            fail("; ".join(errors))
        check_here(cfg)
    note_kfac_options(overrides, configs)


def runs_here(cfg: DictConfig) -> bool:
    """Whether this machine runs the ranks (not a batch job's or an allocation's nodes)."""
    return not cfg.launcher.batch_job and cfg.launcher.scheduler != "slurm" and not inside_slurm_allocation(os.environ)


def check_here(cfg: DictConfig) -> None:
    """The checks that need the model and the machine (trainer/preflight.py), before a work dir exists.

    The device checks only where the ranks will run on this machine: a login node without
    GPUs may well submit a GPU job.
    """
    from trainer.preflight import problems

    found = problems(cfg, devices=runs_here(cfg))
    if runs_here(cfg) and cfg.trainer.precision == "fp16" and cfg.trainer.device == "auto":
        import torch

        if not torch.cuda.is_available():
            found.append("trainer.precision=fp16: fp16 with a loss scaler is for GPUs, and this machine has no "
                         "CUDA device; use trainer.precision=bf16 (autocast on CPUs) or fp32")
    if found:
        fail("; ".join(found))


def note_kfac_options(overrides: list[str], configs: list[DictConfig]) -> None:
    """Says in one line that K-FAC options given without ``--kfac`` change nothing."""
    if any(cfg.kfac.enabled for cfg in configs):
        return
    given = [o for o in overrides if o.lstrip("+~").startswith("kfac.")]
    if given:
        keys = ", ".join(o.lstrip("+~").partition("=")[0] for o in given)
        print(f"kfac.py: note: {keys} has no effect without --kfac (kfac.enabled=true)", file=sys.stderr)


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value: bare when safe, else quoted."""
    if re.fullmatch(r"[\w/.\-+:@%]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_source(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """Resolves ``trainer.resume`` to one checkpoint file and checks it against this run.

    Runs before any work dir is made, so a bad checkpoint costs nothing; the returned overrides
    name the file, so every rank (and a requeued job) resumes from the same one. ``auto`` stays
    as it is: it means the (new) work dir's own checkpoints, found by the ranks.
    """
    from models import build_model
    from trainer.resume import checked_resume

    if cfg.trainer.resume in (None, "", "auto"):
        return overrides
    resumed = checked_resume(cfg, lambda: build_model(cfg.model.name))
    if resumed.note():
        print(f"kfac.py: note: {resumed.note()}", file=sys.stderr, flush=True)
    path = resumed.path
    cfg.trainer.resume = str(path)
    kept = [o for o in overrides if o.lstrip("+~").partition("=")[0] != "trainer.resume"]
    return [*kept, f"trainer.resume={hydra_value(str(path))}"]


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Runs one composed config: as one rank of a job, or by starting the run's ranks.

    Bad data, a bad checkpoint or a numerical stop end in one line (Hydra would print a
    traceback for an exception that leaves this function).
    """
    from trainer.checkpoint import CheckpointError
    from trainer.config import validate
    from trainer.data.mnist import DataError
    from trainer.gradients import NonFiniteError
    from trainer.preflight import SetupError

    errors = validate(cfg)
    if errors:
        fail("; ".join(errors))

    try:
        launch(cfg)
    except (DataError, CheckpointError, SetupError) as err:
        fail(str(err))
    except DiskFullError as err:  # a checkpoint, metrics or log write (launcher/workdir.py)
        fail(str(err), DISK_FULL_STATUS)
    except NonFiniteError as err:
        fail(str(err), 3, "stopped")


def launch(cfg: DictConfig) -> None:
    """Trains here as one rank of a started job, or starts the run's ranks."""
    from trainer.config import section
    from trainer.run import train

    hydra_cfg = HydraConfig.get()
    if os.environ.get(LAUNCHED):  # this process is one rank of a started job
        train(cfg, hydra_cfg.runtime.output_dir, rank_info(os.environ))
        return
    if started_by_torchrun(os.environ):  # torchrun started the ranks: each trains here
        train_under_torchrun(cfg, hydra_cfg.runtime.output_dir)
        return
    from launcher.batch import SubmitError
    from launcher.launch import LaunchError, Run, start

    overrides = resume_source(cfg, list(hydra_cfg.overrides.task))
    launcher = section(cfg.launcher, LauncherConfig)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        work_dir = Path(hydra_cfg.runtime.output_dir).resolve()  # <sweep dir>/<job number>
    else:
        work_dir = choose_work_dir(Path(launcher.experiment_dir).resolve(), launcher.job_name, datetime.now())
    run = Run(launcher=launcher, work_dir=work_dir, overrides=overrides,
              config_yaml=OmegaConf.to_yaml(cfg, resolve=True), script=os.path.abspath(__file__))
    try:
        status = start(run, lambda out: train(cfg, str(out)))
    except (LaunchError, SubmitError) as err:
        fail(str(err))
    if status in (2, 3, DISK_FULL_STATUS):  # the ranks have said why, in one line
        sys.exit(status)
    if status:
        print(f"kfac.py: the run ended with status {status}; see {work_dir / ERR_LOG}", file=sys.stderr)
        sys.exit(status)


def train_under_torchrun(cfg: DictConfig, output_dir: str) -> None:
    """One rank of a job torchrun started: the ranks meet in torch.distributed (no MPI), rank 0
    makes the work dir (``config.yaml``; ``out.log`` and ``err.log`` copy its output) and tells
    the others, then every rank trains into it.

    The process group joined here (gloo on CPUs, NCCL on GPUs; ``trainer.backend`` if set) is
    the one the trainer's communicator then uses (``trainer/ranks/distributed.py``).
    """
    import atexit

    import torch
    import torch.distributed as dist

    from launcher.launch import tee_output
    from launcher.workdir import CONFIG_NAME, atomic_write_text
    from trainer.config import section
    from trainer.run import train

    info = rank_info(os.environ)
    expected = cfg.launcher.nodes * cfg.launcher.procs_per_node
    if expected != info.world_size:  # before any work dir: the run could not start
        nodes = max(1, info.world_size // max(1, info.local_size))
        fail(f"torchrun started {info.world_size} ranks but the config asks for {expected} (launcher.nodes x "
             f"launcher.procs_per_node): add --nodes {nodes} --procs-per-node {info.world_size // nodes}")
    tcfg = cfg.trainer
    cuda = tcfg.device != "cpu" and torch.cuda.is_available()
    backend = tcfg.backend if tcfg.backend != "auto" else "nccl" if cuda else "gloo"
    if backend == "mpi":
        fail("trainer.backend=mpi: torchrun starts no MPI job; use trainer.backend=auto (gloo on CPUs, nccl "
             "on GPUs) or gloo, or start the ranks with python3 kfac.py --procs-per-node N (mpiexec)")
    if cuda:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    chosen: list[Any] = [None]
    if info.rank == 0:
        if os.path.abspath(output_dir) != os.path.abspath("."):  # hydra.run.dir given: that is the work dir
            work_dir = Path(output_dir).resolve()
        else:
            launcher = section(cfg.launcher, LauncherConfig)
            work_dir = choose_work_dir(Path(launcher.experiment_dir).resolve(), launcher.job_name, datetime.now())
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work_dir / CONFIG_NAME, OmegaConf.to_yaml(cfg, resolve=True), mode=0o644)
        print(f"work dir: {work_dir} ({info.world_size} ranks started by torchrun, backend {backend})", flush=True)
        chosen = [str(work_dir)]
    dist.broadcast_object_list(chosen, src=0)
    work_dir = Path(chosen[0])
    with tee_output(work_dir) if info.rank == 0 else contextlib.nullcontext():
        train(cfg, str(work_dir), info)


def continue_saved_run(hydra_args: list[str]) -> list[str]:
    """``trainer.resume`` (not ``auto``): the newest intact checkpoint it names (``trainer/resume.py``)
    and, under this command line's overrides, the config its run was started with
    (``launcher/resumed.py``), so ``trainer.resume=<work dir>`` alone continues that run."""
    overrides, config_dirs, multirun = split_hydra_args(hydra_args)
    given = [o for o in overrides if override_key(o) == "trainer.resume"]
    value = given[-1].partition("=")[2].strip("'\"") if given else ""
    if multirun or value in ("", "auto", "null") or "--cfg" in hydra_args:
        return hydra_args
    from trainer.config import validate

    try:  # a bad override or value is reported by precompose, with the rest
        user = compose_points(overrides, config_dirs, False)[0]
        defaults = compose_points([], config_dirs, False)[0]
    except ComposeError:
        return hydra_args
    if validate(user):
        return hydra_args
    from trainer.checkpoint import CheckpointError
    from trainer.resume import newest_intact, resume_candidates

    try:
        resumed = newest_intact(resume_candidates(value, experiment_dir=user.launcher.experiment_dir,
                                                  job_name=user.launcher.job_name))
    except CheckpointError as err:
        fail(str(err))
    speaks = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the job
    if resumed.note() and speaks:
        print(f"kfac.py: note: {resumed.note()}", file=sys.stderr, flush=True)
    saved = saved_config_path(resumed.path)
    carried = []
    if saved is not None:
        as_dict = lambda cfg: OmegaConf.to_container(cfg, resolve=True)  # noqa: E731
        carried = carried_overrides(as_dict(OmegaConf.load(saved)), as_dict(defaults), as_dict(user), overrides)
        if speaks:
            mine = [o for o in overrides if override_key(o) != "trainer.resume"]
            print(f"resuming with the config of {saved}" + (f", and here: {' '.join(mine)}" if mine else ""), flush=True)
    rest = [a for a in hydra_args if a not in given]
    return [*carried, *rest, f"trainer.resume={hydra_value(str(resumed.path))}"]


def split_hydra_args(args: list[str]) -> tuple[list[str], list[str], bool]:
    """(overrides, ``--config-dir`` folders, whether ``-m``) from Hydra's command line."""
    overrides, config_dirs, multirun = [], [], False
    it = iter(args)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if arg in ("-m", "--multirun"):
            multirun = True
        elif flag in ("-cd", "--config-dir"):
            config_dirs.append(value if eq else next(it, ""))
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, config_dirs, multirun


def show_help() -> None:
    """Prints the LBANN flag table and the config groups, in the shape of Hydra's app help.

    Written here rather than by Hydra: Hydra's help would compose the config, which needs the
    schema, the trainer and torch, and take seconds for a page of text.
    """
    groups = config_groups()
    lines = [help_text(), "== Configuration groups ==", "Compose your configuration from those groups (group=option)", ""]
    lines += [f"{group}: {', '.join(group_options(group))}" for group in groups]
    lines += ["", "== Config ==", "Override anything in the config (foo.bar=value); --cfg job prints it composed.", "",
              "Powered by Hydra (https://hydra.cc)", "Use --hydra-help to view Hydra specific help", ""]
    sys.stdout.write("\n".join(lines))
    sys.stdout.flush()


def cli(argv: list[str]) -> None:
    """Translates LBANN flags, checks the config, then hands over to Hydra."""
    try:
        hydra_args = translate(argv)
    except FlagError as err:
        fail(str(err))
    if "--help" in hydra_args or "-h" in hydra_args:
        show_help()
        return
    register_schema()
    if not os.environ.get(LAUNCHED):  # a started rank gets the launcher's overrides, already resolved
        hydra_args = continue_saved_run(hydra_args)
    informational = {"--cfg", "-c", "--info", "-i", "--hydra-help", "--version", "--shell-completion", "-sc",
                     "-cp", "-cn", "--config-path", "--config-name", "--experimental-rerun"}
    if not informational.intersection(a.partition("=")[0] for a in hydra_args):
        overrides, config_dirs, multirun = split_hydra_args(hydra_args)
        precompose(overrides, config_dirs, multirun)
    sys.argv = [sys.argv[0], *hydra_args]
    main()


if __name__ == "__main__":
    try:
        cli(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:  # `kfac.py --help | head -1`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during it
        fail("stopped by Ctrl-C; no checkpoint written by this stop", 130, "interrupted")
