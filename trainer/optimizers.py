"""LBANN's five optimizers with LBANN's hyperparameters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trainer.lr_schedule import schedule_errors

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("momentum", "sgd", "adam", "adamw", "adagrad", "rmsprop")


@dataclass
class OptimizerConfig:
    """The optimizer group of the config (``configs/optimizer/*.yaml``)."""

    name: str = "adam"
    learning_rate: float = 0.001
    momentum: float = 0.9  # momentum
    nesterov: bool = False  # momentum: Nesterov's variant
    beta1: float = 0.9  # adam
    beta2: float = 0.99  # adam
    decay: float = 0.99  # rmsprop
    eps: float = 1e-8  # adam, adagrad, rmsprop
    # L2 weight decay, all optimizers; 0 as in LBANN's examples. It is added inside the optimizer's
    # step, so with K-FAC it joins the already preconditioned gradient (not preconditioned itself).
    weight_decay: float = 0.0
    # The learning-rate schedule, every optimizer (trainer/lr_schedule.py): the rate is a pure
    # function of the step, so a resumed run continues it exactly.
    warmup_steps: int = 0  # linear warm-up: lr * (s+1)/W for the first W steps
    schedule: str = "constant"  # constant | cosine | step, after the warm-up
    schedule_steps: int = 0  # S, the decay's horizon in steps; 0: the whole run (epochs x steps per epoch)
    final_lr_fraction: float = 0.0  # cosine: the floor, a fraction of learning_rate
    step_gamma: float = 0.1  # step: the factor at each milestone
    step_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of S


def validate_optimizer(cfg: OptimizerConfig) -> list[str]:
    """Returns one message per invalid field, each naming its key."""
    errors = []
    if cfg.name not in OPTIMIZERS:
        errors.append(f"optimizer.name: {cfg.name!r} is not one of {', '.join(OPTIMIZERS)}")
    if not cfg.learning_rate > 0:
        errors.append(f"optimizer.learning_rate: must be > 0, got {cfg.learning_rate}")
    if not cfg.weight_decay >= 0:
        errors.append(f"optimizer.weight_decay: must be >= 0, got {cfg.weight_decay}")
    return errors + schedule_errors(cfg)


def build_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Builds the optimizer named by ``cfg.name`` over ``params``."""
    import torch  # here, not above: the config and its validation run without torch

    lr, wd = cfg.learning_rate, cfg.weight_decay
    if cfg.name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd, nesterov=cfg.nesterov)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=wd)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=wd)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=cfg.eps, weight_decay=wd)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=cfg.decay, eps=cfg.eps, weight_decay=wd)
    raise ValueError(f"optimizer.name: {cfg.name!r} is not one of {', '.join(OPTIMIZERS)}")
