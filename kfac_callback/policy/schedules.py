"""Damping warm-up and the factor-update / inverse-compute schedules (docs/algorithm.md §4).

``s`` counts completed training steps from 0; the step being taken has index ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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
