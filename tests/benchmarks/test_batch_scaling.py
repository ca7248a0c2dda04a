"""benchmarks/batch_scaling.py on synthetic outcomes: the grid widening, the best run, the critical batch, files."""

from __future__ import annotations

import math

import pytest

from benchmarks.batch_scaling import (
    LR_GRID,
    Outcome,
    Run,
    best_of,
    critical_batch,
    first_grid,
    lr_run,
    markdown,
    next_lr,
    steps_curve,
    write_csv,
    write_plot,
)
from benchmarks.batch_scaling import test_every as interval  # not named test_*: pytest would collect it
from benchmarks.time_to_accuracy import Point, first_hits


def fake(batch: int, family: str, lr: float, accuracies: list[float], every: int = 10, phase: str = "lr") -> Outcome:
    run = lr_run(batch, family, lr, phase)
    points = [Point(float(i), acc, (i + 1) * every, (i + 1) * every * batch / 60000) for i, acc in enumerate(accuracies)]
    return Outcome(run, points, first_hits(points, (97.5, 98.0)), "ok", {})


def test_first_grid_is_the_centre_and_its_neighbours():
    assert first_grid("adam", 1000) == [1e-3, 3e-3, 1e-2]
    assert first_grid("adam", 100) == [3e-4, 1e-3, 3e-3]
    assert first_grid("kfac", 100) == [0.03, 0.1, 0.3]
    for fam in LR_GRID:
        for b in (100, 300, 1000, 3000, 10000):
            assert len(first_grid(fam, b)) == 3


def test_next_lr_widens_only_past_an_edge():
    grid = LR_GRID["adam"]
    assert next_lr(grid, [1e-3, 3e-3, 1e-2], 1e-2) == 3e-2
    assert next_lr(grid, [1e-3, 3e-3, 1e-2], 1e-3) == 3e-4
    assert next_lr(grid, [1e-3, 3e-3, 1e-2], 3e-3) is None
    assert next_lr(grid, [1e-2, 3e-2], 3e-2) is None  # the grid's own end
    assert next_lr(grid, [1e-4, 3e-4], 1e-4) is None


def test_best_is_fewest_steps_to_98_then_975_then_accuracy():
    a = fake(1000, "adam", 1e-3, [97.0, 97.6, 98.1])  # 98% at step 30
    b = fake(1000, "adam", 3e-3, [97.6, 98.0])  # 98% at step 20
    c = fake(1000, "adam", 1e-2, [97.6, 97.7, 97.9])  # 97.5% at 10, never 98%
    assert best_of([a, b, c]) is b
    assert best_of([a, c]) is a
    d = fake(1000, "adam", 3e-2, [97.0, 97.4])
    assert best_of([c, d]) is c
    assert best_of([d, fake(1000, "adam", 1e-4, [96.0])]) is d


def test_steps_curve_takes_the_best_run_per_batch():
    runs = [fake(100, "adam", 1e-3, [97.0] * 9 + [98.0]), fake(100, "adam", 3e-3, [97.0] * 4 + [98.0]),
            fake(1000, "adam", 3e-3, [97.0, 98.0]), fake(1000, "kfac", 0.3, [97.0])]
    assert steps_curve(runs, "adam", 98.0, [100, 1000]) == {100: 50, 1000: 20}
    assert steps_curve(runs, "kfac", 98.0, [100, 1000]) == {100: None, 1000: None}


def test_critical_batch_is_where_a_doubling_stops_saving_a_third():
    # Perfect scaling (steps ∝ 1/batch) to 1000, then flat: critical at 1000.
    assert critical_batch({100: 1000, 300: 333, 1000: 100, 3000: 90}) == (1000, "measured")
    # The bound for 300 -> 1000 is (2/3)^log2(10/3) = 0.259: a ratio of 0.27 fails it.
    bound = (2 / 3) ** math.log2(1000 / 300)
    assert critical_batch({300: 1000, 1000: math.ceil(1000 * bound) + 1})[0] == 300
    assert critical_batch({300: 1000, 1000: math.floor(1000 * bound)}) == (1000, "at least (still scaling at the largest batch)")
    # A target never reached at the larger batch ends the scaling there.
    assert critical_batch({100: 1000, 1000: 100, 3000: None}) == (1000, "measured")
    assert critical_batch({100: None, 1000: None}) == (None, "target never reached")


def test_report_files(tmp_path):
    runs = [fake(100, "adam", 1e-3, [97.0, 97.6, 98.1]), fake(100, "kfac", 0.1, [97.6, 98.2]),
            fake(100, "momentum", 0.03, [97.0, 97.2]), fake(1000, "adam", 3e-3, [97.9, 98.0]),
            fake(1000, "kfac", 0.3, [98.0])]
    text = markdown(runs, [100, 1000], {"jobs": 1, "cpu_count": 2})
    assert "| 100 | 20 /" in text  # K-FAC's 98% at step 20 at batch 100
    assert "| 0.67 |" in text  # K-FAC 20 steps over Adam's 30 at batch 100, 98%
    write_csv(runs, tmp_path / "b.csv")
    assert (tmp_path / "b.csv").read_text().count("\n") == len(runs) + 1
    write_plot(runs, [100, 1000], tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 10000


def test_run_names_are_unique_per_batch_family_lr_and_phase():
    names = {lr_run(b, f, lr, p, tag=p).name for b in (100, 1000) for f in LR_GRID for lr in LR_GRID[f][:2]
             for p in ("lr", "_cos")}
    assert len(names) == 2 * 3 * 2 * 2
    assert isinstance(lr_run(100, "adam", 1e-3), Run)


@pytest.mark.parametrize(("batch", "every"), [(100, 50), (1000, 5), (3000, 2), (10000, 1)])
def test_test_interval(batch, every):
    assert interval(batch) == every


def test_objective_hits_are_the_first_full_train_evaluations_below_each_value():
    from benchmarks.batch_scaling import objective_every, objective_hits

    records = [{"kind": "test", "step": s, "train_time": float(s), "train_objective_full": v}
               for s, v in ((10, 0.05), (20, 0.009), (30, 0.002), (40, 0.0009))]
    records.insert(2, {"epoch": 0, "step": 25, "train_objective": 1e-9})  # an epoch record: not a full-train pass
    hits = objective_hits(records)
    assert hits[1e-2]["step"] == 20 and hits[1e-3]["step"] == 40
    assert [p["step"] for p in hits["curve"]] == [10, 20, 30, 40]
    assert objective_hits(records[:2])[1e-3] is None
    assert objective_every(100) == 300 and objective_every(3000) == 10
