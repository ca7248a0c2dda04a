"""Damping warm-up, update-interval interpolation and compute steps (docs/algorithm.md §4)."""

from __future__ import annotations

import math

import pytest

from kfac_callback.policy.schedules import (
    DampingSchedule,
    is_compute_step,
    is_update_step,
    update_interval,
)


@pytest.mark.parametrize(("d0", "d1", "warmup"), [(0.1, 0.01, 100), (1.0, 0.03, 50)])
def test_damping_follows_closed_form(d0: float, d1: float, warmup: int) -> None:
    alpha = 2 * math.log10(d0 / d1) / warmup
    sched = DampingSchedule([d0, d1], warmup)
    seen = {}
    for s in range(301):
        seen[s] = sched.value  # the damping used at step s
        sched.advance()
    for s in (0, 1, 2, 10, 99, 100, 300):
        assert seen[s] == pytest.approx(d1 + (1 - alpha) ** (s + 1) * (d0 - d1), rel=1e-12)
    # Step 0 already sees one update ("every step starting before the first").
    assert seen[0] == pytest.approx((1 - alpha) * d0 + alpha * d1, rel=1e-15)


def test_constant_damping_stays() -> None:
    sched = DampingSchedule([0.03], 100)
    for _ in range(5):
        sched.advance()
    assert sched.value == 0.03
    assert DampingSchedule([0.5, 0.5], 10).value == 0.5


def test_warming_up_is_refused() -> None:
    with pytest.raises(ValueError, match=r"init 0.01 < target 1 is not allowed"):
        DampingSchedule([0.01, 1.0], 100)


@pytest.mark.parametrize(("k0", "k1", "steps", "table"), [
    (1, 1, 0, {0: 1, 5: 1, 100: 1}),
    (1, 5, 0, {0: 5, 3: 5}),  # S = 0: straight to the target
    (1, 5, 8, {0: 1, 1: 1, 2: 2, 3: 2, 4: 3, 6: 4, 7: 4, 8: 5, 20: 5}),
    (10, 2, 4, {0: 10, 1: 8, 2: 6, 3: 4, 4: 2, 9: 2}),
])
def test_update_interval_table(k0: int, k1: int, steps: int, table: dict[int, int]) -> None:
    assert {s: update_interval(s, k0, k1, steps) for s in table} == table


def test_update_steps_table() -> None:
    # k(s) for (1, 5, 8): 1 1 2 2 3 3 4 4 5 5 5 ...; update when s mod k(s) == 0, so
    # s = 4 (k 3), 6 (k 4) and 8 (k 5) do not update.
    updates = [s for s in range(21) if is_update_step(s, 1, 5, 8)]
    assert updates == [0, 1, 2, 10, 15, 20]
    assert [s for s in range(10) if is_update_step(s, 3, 3, 0)] == [0, 3, 6, 9]


def test_compute_steps() -> None:
    assert [s for s in range(10) if is_compute_step(s, 4)] == [0, 4, 8]
    assert all(is_compute_step(s, 1) for s in range(5))
