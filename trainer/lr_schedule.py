"""The learning rate as a pure function of the step: warm-up, then constant, cosine or step decay.

Pure, so a resumed run (whose step comes from its checkpoint) continues the schedule exactly,
and every rank, which counts the same steps, sets the same rate. The trainer applies it to
every param group before each step's hooks (``Trainer.lr_schedule``).
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULES = ("constant", "cosine", "step")


def horizon(cfg: Any, total_steps: int) -> int:
    """S: ``optimizer.schedule_steps``, or the whole run (``total_steps``) when it is 0."""
    return int(cfg.schedule_steps) or int(total_steps)


def learning_rate(cfg: Any, step: int, total_steps: int) -> float:
    """The rate of optimizer step ``step`` (counted from 0) of a run of ``total_steps`` steps.

    ``cfg`` is the optimizer group (``trainer.optimizers.OptimizerConfig`` or anything with its
    fields). Warm-up: base * (s+1)/W for s < W. Then ``constant`` keeps base; ``cosine`` goes
    from base down to base * ``final_lr_fraction`` over steps W..S and stays there; ``step``
    multiplies base by ``step_gamma`` once per milestone (a fraction of S) that s has reached.
    """
    base, warm = float(cfg.learning_rate), int(cfg.warmup_steps)
    if step < warm:
        return base * (step + 1) / warm
    if cfg.schedule == "constant":
        return base
    end = horizon(cfg, total_steps)
    if cfg.schedule == "cosine":
        # A horizon inside the warm-up leaves no room to decay: straight to the floor.
        t = min(1.0, (step - warm) / (end - warm)) if end > warm else 1.0
        floor = float(cfg.final_lr_fraction)
        return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))
    if cfg.schedule == "step":
        passed = sum(step >= f * end for f in cfg.step_milestones)
        return base * float(cfg.step_gamma) ** passed
    raise ValueError(f"optimizer.schedule: {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")


def describe(cfg: Any, total_steps: int) -> str:
    """One setup line for a run whose rate changes (``""`` for a constant rate without warm-up)."""
    if cfg.schedule == "constant" and not cfg.warmup_steps:
        return ""
    parts = [f"base {cfg.learning_rate:g}"]
    if cfg.warmup_steps:
        parts.append(f"linear warm-up over {cfg.warmup_steps} steps")
    end = horizon(cfg, total_steps)
    if cfg.schedule == "cosine":
        parts.append(f"cosine to {cfg.final_lr_fraction:g} x base at step {end}")
    elif cfg.schedule == "step":
        steps = ", ".join(f"{math.ceil(f * end)}" for f in cfg.step_milestones)
        parts.append(f"x {cfg.step_gamma:g} at steps {steps}")
    return f"optimizer: {cfg.name}, learning rate schedule {cfg.schedule}: " + ", ".join(parts)


def schedule_errors(cfg: Any) -> list[str]:
    """One message per invalid schedule field of the optimizer group, each naming its key."""
    errors = []
    if cfg.warmup_steps < 0:
        errors.append(f"optimizer.warmup_steps: must be >= 0 (0: no warm-up), got {cfg.warmup_steps}")
    if cfg.schedule not in SCHEDULES:
        errors.append(f"optimizer.schedule: {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if cfg.schedule_steps < 0:
        errors.append(f"optimizer.schedule_steps: must be >= 0 (0: the whole run), got {cfg.schedule_steps}")
    elif 0 < cfg.schedule_steps <= cfg.warmup_steps and cfg.schedule != "constant":
        errors.append(f"optimizer.schedule_steps={cfg.schedule_steps}: must be > optimizer.warmup_steps="
                      f"{cfg.warmup_steps} (the decay comes after the warm-up)")
    if not 0 <= cfg.final_lr_fraction <= 1:
        errors.append(f"optimizer.final_lr_fraction: must be in [0, 1] (a fraction of the learning rate), "
                      f"got {cfg.final_lr_fraction}")
    if not 0 < cfg.step_gamma <= 1:
        errors.append(f"optimizer.step_gamma: must be in (0, 1], got {cfg.step_gamma}")
    milestones = list(cfg.step_milestones)
    if any(not 0 < f <= 1 for f in milestones) or milestones != sorted(milestones):
        errors.append(f"optimizer.step_milestones: must be increasing fractions of optimizer.schedule_steps "
                      f"in (0, 1], got {milestones}")
    return errors
