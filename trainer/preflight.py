"""Checks of a composed config against the model and this machine, before anything starts.

``trainer.config.validate`` checks values alone; these need more: the model's layer names,
whether this machine has CUDA, whether the data folder is usable. ``kfac.py`` runs them before
it makes a work dir (when the ranks will run on this machine), and every rank runs them again
as it sets up (a cluster's nodes may differ from the machine that submitted the job). Each
problem is one line naming the key and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kfac_callback.blocks import preconditionable_layers
from models import MODELS, build_model
from trainer.data.mnist_fetch import data_dir_problem, default_data_dir


class SetupError(RuntimeError):
    """A rank cannot start as configured; the message is one line naming the key or file."""


def layer_problems(cfg: Any) -> list[str]:
    """``kfac.disable_layers`` names that are not preconditionable layers of the model."""
    if not cfg.kfac.enabled or not cfg.kfac.disable_layers or cfg.model.name not in MODELS:
        return []
    with torch.device("meta"):  # names only: no memory, no random draws
        model = build_model(cfg.model.name)
    layers = preconditionable_layers(model)
    unknown = [name for name in cfg.kfac.disable_layers if name not in layers]
    if not unknown:
        return []
    return [f"kfac.disable_layers: {', '.join(unknown)} is not a layer of model {cfg.model.name} "
            f"(its layers: {', '.join(layers)})"]


def device_problems(cfg: Any) -> list[str]:
    """``trainer.device=cuda`` or ``trainer.backend=nccl`` where this machine has no GPU."""
    if torch.cuda.is_available():
        return []
    problems = []
    if cfg.trainer.device == "cuda":
        problems.append("trainer.device=cuda: this machine has no CUDA device; use trainer.device=auto "
                        "(a GPU where there is one, else the CPU) or trainer.device=cpu")
    ranks = cfg.launcher.nodes * cfg.launcher.procs_per_node
    if cfg.trainer.backend == "nccl" and ranks > 1:
        problems.append("trainer.backend=nccl: NCCL needs GPUs and this machine has none; use "
                        "trainer.backend=auto (mpi on CPUs), mpi or gloo")
    return problems


def data_problems(cfg: Any) -> list[str]:
    """The data folder exists as something else, or cannot receive the MNIST files."""
    problem = data_dir_problem(Path(cfg.data.dir) if cfg.data.dir else default_data_dir())
    return [problem] if problem else []


def problems(cfg: Any, devices: bool = True) -> list[str]:
    """Every problem of ``cfg`` on this machine (``devices=False``: leave out the GPU checks);
    empty when it can start here."""
    return [*layer_problems(cfg), *(device_problems(cfg) if devices else []), *data_problems(cfg)]
