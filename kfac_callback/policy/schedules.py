"""Damping warm-up and the factor-update / inverse-compute schedules (docs/algorithm.md §4).

``s`` counts completed training steps from 0; the step being taken has index ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kfac_callback.blocks import Dampings
from kfac_callback.config import DAMPING_KEYS


class DampingSchedule:
    """One damping value, constant or warming down from ``d0`` to ``d1`` (docs/algorithm.md §4).

    With a pair, ``alpha = 2·log10(d0/d1)/W`` and ``d <- (1-alpha)·d + alpha·d1`` is applied
    every step starting before the first, so the value used at step ``s`` is
    ``d1 + (1-alpha)^(s+1)·(d0-d1)``. The update is applied iteratively, as LBANN does, so
    that the state is just the current value.

    Args:
        values: ``[v]`` (constant) or ``[d0, d1]`` with ``d0 >= d1 > 0``.
        warmup_steps: W, the number of steps of the warm-up.

    Raises:
        ValueError: For ``d0 < d1`` or a malformed list.
    """

    def __init__(self, values: Sequence[float], warmup_steps: int) -> None:
        values = [float(v) for v in values]
        if len(values) not in (1, 2):
            raise ValueError(f"damping: expected one value or [init, target], got {values}")
        self.values = values
        if len(values) == 1 or values[0] == values[1]:
            self.alpha = 0.0
            self.value = values[0]
            return
        d0, d1 = values
        if d0 < d1:
            raise ValueError(f"damping: init {d0:g} < target {d1:g} is not allowed "
                             "(damping warms DOWN from init to target)")
        if d1 <= 0 or warmup_steps < 1:
            raise ValueError(f"damping: a warm-up from {d0:g} to {d1:g} needs target > 0 and "
                             f"warm-up steps >= 1 (got {warmup_steps})")
        self.alpha = 2.0 * math.log10(d0 / d1) / warmup_steps
        # "Every step starting before the first": the first step already sees one update.
        self.value = d0
        self.advance()

    @property
    def target(self) -> float:
        """The value the damping converges to."""
        return self.values[-1]

    def advance(self) -> None:
        """Moves the damping one step towards its target."""
        if self.alpha:
            self.value = (1.0 - self.alpha) * self.value + self.alpha * self.target


def update_interval(s: int, k0: int, k1: int, steps: int) -> int:
    """Factor-update interval ``k(s) = floor(k0 + (k1-k0)·min(s/S, 1))``; ``S = 0`` gives k1."""
    if steps <= 0:
        return k1
    return max(1, math.floor(k0 + (k1 - k0) * min(s / steps, 1.0)))


def is_update_step(s: int, k0: int, k1: int, steps: int) -> bool:
    """Whether the factors are updated at step ``s`` (always at ``s = 0``)."""
    return s == 0 or s % update_interval(s, k0, k1, steps) == 0


def is_compute_step(s: int, compute_interval: int) -> bool:
    """Whether the inverses are recomputed at step ``s`` (always at ``s = 0``)."""
    return s == 0 or s % compute_interval == 0


class StepSchedule:
    """What step s does: whether it updates the factors or recomputes the inverses, and the
    dampings it uses (warm-up schedules, or with ``adapt_damping`` tied to the adaptive λ).

    Args:
        config: The callback's ``KFACConfig``.
        adaptive: The adaptive rules (their λ, when ``adapt_damping``).

    Attributes:
        dampings: The four ``DampingSchedule`` (act, err, bn_act, bn_err).
    """

    def __init__(self, config: Any, adaptive: Any) -> None:
        self.config = config
        self.adaptive = adaptive
        self.dampings = [DampingSchedule(getattr(config, k), config.damping_warmup_steps) for k in DAMPING_KEYS]

    def current_dampings(self) -> Dampings:
        """The dampings the next step uses; with ``adapt_damping`` tied to λ: √(λ + η) for the
        Kronecker factors, λ + η for BatchNorm's block (docs/algorithm.md §9)."""
        if self.config.adapt_damping:
            gamma = self.adaptive.factor_damping()
            return Dampings(gamma, gamma, gamma * gamma, gamma * gamma)
        return Dampings(*(d.value for d in self.dampings))

    def update_interval(self, s: int) -> int:
        """k(s), the factor-update interval at step s."""
        c = self.config
        return update_interval(s, c.update_interval_init, c.update_interval_target, c.update_interval_steps)

    def updates_factors(self, s: int) -> bool:
        """Whether step s updates the factors."""
        c = self.config
        return is_update_step(s, c.update_interval_init, c.update_interval_target, c.update_interval_steps)

    def computes_inverses(self, s: int) -> bool:
        """Whether step s recomputes the inverses (on schedule)."""
        return is_compute_step(s, self.config.compute_interval_steps)

    def advance(self) -> None:
        """One step done: the damping warm-up moves on."""
        for d in self.dampings:
            d.advance()
