"""Builds a run from the composed config and trains it: the inside of one rank."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from kfac_callback.base import rank0_print
from launcher.env import RankInfo, threads_per_rank
from launcher.workdir import METRICS_FILE, PREEMPTED_FILE
from models import build_model
from trainer.checkpoint import CHECKPOINT_DIR, CheckpointPolicy, model_shapes, run_identity
from trainer.config import DataConfig, TrainerConfig, section
from trainer.data.mnist import default_data_dir, ensure_mnist, load_mnist
from trainer.lr_schedule import describe, learning_rate
from trainer.observe.callbacks import MemoryCallback, PrintCallback, TimerCallback
from trainer.observe.progress import ProgressCallback
from trainer.optimizers import OptimizerConfig, build_optimizer
from trainer.preflight import SetupError, problems
from trainer.ranks.distributed import make_communicator
from trainer.ranks.placement import gather_placements, placement_lines
from trainer.ranks.watchdog import StepWatchdog
from trainer.resume import checked_resume
from trainer.tasks import make_task
from trainer.trainer import Trainer


def choose_device(name: str, local_rank: int) -> torch.device:
    """``auto``: the GPU of this rank's local index where CUDA exists, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SetupError("trainer.device=cuda: this node has no CUDA device; use trainer.device=auto or cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def build_trainer(cfg: Any, output_dir: Optional[str], info: Optional[RankInfo] = None) -> Trainer:
    """Builds communicator, data, model, optimizer and callbacks, each from its slice of ``cfg``."""
    info = info or RankInfo()
    tcfg: TrainerConfig = section(cfg.trainer, TrainerConfig)
    dcfg: DataConfig = section(cfg.data, DataConfig)
    ocfg: OptimizerConfig = section(cfg.optimizer, OptimizerConfig)
    expected = cfg.launcher.nodes * cfg.launcher.procs_per_node
    if info.world_size != expected and info.torchrun:
        nodes = max(1, info.world_size // max(1, info.local_size))
        raise SetupError(f"torchrun started {info.world_size} ranks but the config asks for {expected} "
                         f"(launcher.nodes x launcher.procs_per_node): add --nodes {nodes} --procs-per-node "
                         f"{info.world_size // nodes}")
    if info.world_size != expected:
        raise SetupError(f"this job has {info.world_size} ranks but the config asks for {expected} "
                         "(launcher.nodes x launcher.procs_per_node): start it with kfac.py, or match the two")
    found = problems(cfg)  # checked again here: the node a rank runs on may differ from the submitter
    if found:
        raise SetupError("; ".join(found))

    torch.set_flush_denormal(tcfg.flush_denormal)
    if tcfg.num_threads or info.local_size > 1 or "OMP_NUM_THREADS" not in os.environ:
        # One thread pool per rank, sized to its share of the cores it may use (its CPU affinity):
        # oversubscribed ranks thrash. OpenMP's passive waits are set before torch loads (kfac.py).
        torch.set_num_threads(threads_per_rank(tcfg.num_threads, info.local_size))
    device = choose_device(tcfg.device, info.local_rank)
    if tcfg.precision == "fp16" and device.type != "cuda":
        raise SetupError("trainer.precision=fp16: fp16 with a loss scaler is for GPUs, and this node has no CUDA "
                         "device; use trainer.precision=bf16 (autocast on CPUs) or fp32")
    try:
        comm = make_communicator(info, tcfg.backend, device.type, multi_node=cfg.launcher.nodes > 1)
    except ValueError as err:  # a backend this device cannot use
        raise SetupError(str(err)) from None
    placements = gather_placements(comm, info.local_rank)
    # Before the data: a bad checkpoint is refused at once. A requeued job prefers its own newest.
    # (The model built for its shapes draws from the RNG; the seed is set again below.)
    resumed = checked_resume(cfg, lambda: build_model(cfg.model.name), work_dir=output_dir, device=device)
    progress = ProgressCallback.from_setting(tcfg.progress, comm.rank)
    log = progress.wrap(rank0_print(comm))  # bar-safe: bars are cleared around each line
    if comm.world_size > 1:
        for line in placement_lines(placements):
            log(line)
    dtype = getattr(torch, tcfg.dtype)

    data_dir = dcfg.dir or default_data_dir()
    if comm.rank == 0:
        ensure_mnist(data_dir)
    comm.barrier()
    data = load_mnist(data_dir, dcfg.max_train_samples, dcfg.max_test_samples, fetch=False)
    if dtype != data.train_x.dtype:
        data = dataclasses.replace(data, train_x=data.train_x.to(dtype), test_x=data.test_x.to(dtype))

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.name).to(device=device, dtype=dtype)
    optimizer = build_optimizer(ocfg, model.parameters())
    task = make_task(cfg.model.task, cfg.model.l2)

    callbacks = [TimerCallback(), PrintCallback(), MemoryCallback()]
    if cfg.kfac.enabled:
        from kfac_callback import KFACCallback

        options = OmegaConf.to_container(cfg.kfac, resolve=True)
        options.pop("enabled")
        callbacks.append(KFACCallback(model, comm=comm, printer=log, output=task.output, l2_reg=task.l2, **options))
    if comm.world_size > 1 and tcfg.step_timeout_s > 0:
        callbacks.append(StepWatchdog(tcfg.step_timeout_s, comm.rank, placements, output_dir))
    # Last, so the timer's batch times leave out drawing the bars.
    callbacks.append(progress)
    if tcfg.tensorboard and output_dir:
        from trainer.observe.tensorboard_log import TensorBoardCallback

        callbacks.append(TensorBoardCallback(os.path.join(output_dir, "tensorboard"), comm.rank))

    metrics_path = os.path.join(output_dir, METRICS_FILE) if output_dir else None
    identity = run_identity(cfg, model_shapes(model))
    policy = None
    if output_dir and tcfg.keep_checkpoints > 0:  # 0: no checkpoints, not even the final one
        policy = CheckpointPolicy(os.path.join(output_dir, CHECKPOINT_DIR), tcfg.checkpoint_every_steps,
                                  tcfg.checkpoint_every_epoch, tcfg.keep_checkpoints, identity, output_dir)
    if output_dir and comm.rank == 0:  # a new start: the marker of an earlier stop is stale
        os.makedirs(output_dir, exist_ok=True)
        Path(output_dir, PREEMPTED_FILE).unlink(missing_ok=True)
    trainer = Trainer(
        model,
        optimizer,
        data,
        epochs=tcfg.epochs,
        mini_batch_size=tcfg.mini_batch_size,
        callbacks=callbacks,
        comm=comm,
        device=device,
        seed=cfg.seed,
        test_every_epoch=tcfg.test_every_epoch,
        test_every_steps=tcfg.test_every_steps,
        stop_at_test_accuracy=tcfg.stop_at_test_accuracy,
        full_train_objective=tcfg.full_train_objective,
        stop_at_train_objective=tcfg.stop_at_train_objective,
        metrics_path=metrics_path,
        log=log,
        checkpoint=policy,
        on_nonfinite=tcfg.on_nonfinite,
        accumulate_steps=tcfg.accumulate_steps,
        precision=tcfg.precision,
        lr_schedule=functools.partial(learning_rate, ocfg),
        task=task,
        max_train_seconds=tcfg.max_train_seconds,
    )
    schedule = describe(ocfg, trainer.epochs * trainer.shape.train_iters)
    if schedule:
        log(schedule)
    if resumed is not None:
        if resumed.note():  # a requeued job's own newest checkpoint was damaged (trainer/resume.py)
            log(f"trainer: note: {resumed.note()}")
        trainer.load_state_dict(resumed.state)
        log(f"resumed from {resumed.path}: step {trainer.step}, epoch {trainer.epoch}, batch {trainer.batch} "
            f"(written by {resumed.state['world_size']} rank(s))")
    return trainer


def train(cfg: Any, output_dir: Optional[str], info: Optional[RankInfo] = None) -> list[dict[str, Any]]:
    """Trains one run (this process's rank of it) and returns its per-epoch records."""
    trainer = build_trainer(cfg, output_dir, info)
    watchdog = next((c for c in trainer.callbacks if isinstance(c, StepWatchdog)), None)
    try:
        return trainer.fit()
    except Exception as err:  # a peer's death surfaces as the communicator's error in the survivors
        if watchdog is not None:
            watchdog.fail_if_ranks_lost(err)
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
