"""benchmarks/batch_scaling.py on synthetic outcomes: the grid widening, the best run, the critical batch, files."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.batch_scaling import (
    LR_GRID,
    Bench,
    first_grid,
    large_batch_run,
    lever_runs,
    lr_run,
    next_lr,
    phase_schedule,
)
from benchmarks.batch_scaling import test_every as interval  # not named test_*: pytest would collect it
from benchmarks.batch_scaling_report import (
    Outcome,
    Run,
    best_of,
    critical_batch,
    fastest_to,
    markdown,
    objective_hits,
    steps_curve,
    write_csv,
    write_plot,
)
from benchmarks.time_to_accuracy_report import Point


def fake(batch: int, family: str, lr: float, accuracies: list[float], every: int = 10, phase: str = "lr") -> Outcome:
    run = lr_run(batch, family, lr, phase)
    points = [Point(float(i), acc, (i + 1) * every, (i + 1) * every * batch / 60000) for i, acc in enumerate(accuracies)]
    return Outcome.of(run, points)


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


def test_each_target_table_shows_the_run_fastest_to_that_target():
    slow98 = fake(1000, "kfac", 1.0, [97.6, 97.8, 98.1])  # 97.5% at 10, 98% at 30
    fast975 = fake(1000, "kfac", 3.0, [97.6, 97.9])  # 97.5% at 10 too, never 98%
    first = fake(1000, "kfac", 0.3, [97.0, 97.0, 97.6, 98.0])  # 97.5% at 30, 98% at 40
    assert fastest_to([first, slow98], 97.5) is slow98
    assert fastest_to([first, slow98], 98.0) is slow98
    assert fastest_to([first, fast975], 98.0) is first
    assert fastest_to([fake(1000, "kfac", 0.1, [96.0]), fast975], 99.0) is fast975  # none: the best
    text = markdown([first, fast975, fake(1000, "adam", 3e-3, [97.0, 97.6, 98.0])], [1000], {})
    assert "| 1000 | 10 / " in text and "(`b1000_kfac_lr3`)" in text  # 97.5%: the rate-3 run
    assert "| 1000 | 40 / " in text and "| 1.33 |" in text  # 98%: rate 0.3's 40 over Adam's 30


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
    from benchmarks.batch_scaling import objective_curve, objective_every

    records = [{"kind": "test", "step": s, "train_time": float(s), "train_objective_full": v}
               for s, v in ((10, 0.05), (20, 0.009), (30, 0.002), (40, 0.0009))]
    records.insert(2, {"epoch": 0, "step": 25, "train_objective": 1e-9})  # an epoch record: not a full-train pass
    hits = objective_hits(objective_curve(records))
    assert hits[1e-2]["step"] == 20 and hits[1e-3]["step"] == 40
    assert [p["step"] for p in hits["curve"]] == [10, 20, 30, 40]
    assert objective_hits(objective_curve(records[:2]))[1e-3] is None
    assert objective_every(100) == 300 and objective_every(3000) == 10


def test_a_stored_summary_gives_back_the_same_outcome():
    o = fake(3000, "kfac", 1.0, [97.0, 97.6, 98.1], every=2)
    o = Outcome.of(o.run, o.points, "ok", [{"step": 2, "train_time": 1.5, "objective": 0.004},
                                           {"step": 4, "train_time": 3.0, "objective": 0.0008}])
    back = Outcome.from_json(o.run.name, o.as_json())
    assert back.run == o.run and back.points == o.points and back.best == 98.1
    assert back.steps_to(97.5) == 4 and back.steps_to(98.0) == 6
    assert back.objective[1e-3]["step"] == 4 and back.objective[1e-2]["step"] == 2


def test_a_summary_without_a_curve_keeps_its_hits_and_best():
    run = lr_run(1000, "adam", 3e-3)
    v = {**run.as_json(), "status": "ok", "curve": None, "best": 98.1, "hits": {"97.5": [110, 1.83, 14.4]}}
    o = Outcome.from_json(run.name, v)
    assert o.steps_to(97.5) == 110 and o.steps_to(98.0) is None and o.best == 98.1
    assert o.hits[97.5].train_time == 14.4
    assert best_of([o, fake(1000, "adam", 1e-3, [97.0])]) is o


def test_bench_records_a_runs_summary_and_resumes_from_the_state_file(tmp_path):
    run = lr_run(1000, "adam", 3e-3)
    metrics = tmp_path / "runs" / run.name / "20261202_120000_x"
    metrics.mkdir(parents=True)
    (metrics / "metrics.jsonl").write_text("\n".join(
        json.dumps({"kind": "test", "step": s, "epochs_done": s / 60, "train_time": s / 10, "test_accuracy": a})
        for s, a in ((5, 97.0), (10, 97.7), (15, 98.2))) + "\n")
    bench = Bench(tmp_path / "runs.json", tmp_path / "runs", jobs=1)
    bench.record(run, "ok")
    again = Bench(tmp_path / "runs.json", tmp_path / "elsewhere", jobs=1)  # a new machine: no run dirs
    assert again.done(run)
    [o] = again.outcomes()
    assert (o.steps_to(97.5), o.steps_to(98.0), o.best) == (10, 15, 98.2)


def test_levers_change_one_thing_of_the_base_run():
    base = lr_run(3000, "kfac", 1.0)
    runs = lever_runs(base)
    assert len({r.name for r in runs}) == len(runs)
    for r in runs:
        assert r.phase == "lever" and r.flags.startswith(base.flags.split(" --optimizer-learning-rate")[0])
        assert r.flags.count("--optimizer-learning-rate") == 1 and f"--optimizer-learning-rate {r.lr:g}" in r.flags
    mom = next(r for r in runs if r.name.endswith("_mom"))
    assert mom.lr == 0.1 and mom.flags.endswith("--optimizer momentum")


def test_lever_and_objective_tables():
    base = fake(3000, "kfac", 1.0, [97.6, 97.9], every=2)
    lever = Outcome.of(lever_runs(base.run)[0], fake(3000, "kfac", 1.0, [97.7, 98.1], every=2).points)
    obj = [Outcome.of(Run(f"{f}_obj", 100, f, "", 0.1, "objective"), [], "ok",
                      [{"step": 100, "train_time": t, "objective": 0.005}, {"step": 200, "train_time": 2 * t,
                                                                             "objective": 0.0009}])
           for f, t in (("kfac", 10.0), ("adam", 40.0))]
    text = markdown([base, lever, *obj], [3000], {})
    assert "## K-FAC levers at batch 3000" in text and "| factors from 1000 samples of the batch | 2 /" in text
    assert "K-FAC seconds / best first-order seconds = 0.25" in text


def test_a_run_given_on_the_command_line_takes_its_rate_from_its_flags():
    from benchmarks.batch_scaling import parse_run

    r = parse_run("b3000_kfaclb_lr1:3000:kfac:large_batch=experiment=kfac_large_batch --optimizer-learning-rate 1")
    assert (r.name, r.batch, r.family, r.phase, r.lr) == ("b3000_kfaclb_lr1", 3000, "kfac", "large_batch", 1.0)
    assert r.flags == "experiment=kfac_large_batch --optimizer-learning-rate 1"
    assert math.isnan(parse_run("x:100:adam:lever=--optimizer adam").lr)
    with pytest.raises(ValueError):
        parse_run("x:100:adam=--optimizer adam")


def test_schedule_phase_covers_every_family_and_the_large_batch_recipe(tmp_path, monkeypatch):
    bench = Bench(tmp_path / "runs.json", tmp_path, jobs=1)
    best = {"kfac": 1.0, "adam": 3e-3, "momentum": 0.3}
    recorded = [fake(3000, f, lr, [97.6]) for f, lr in best.items()]
    lb = Outcome.of(large_batch_run(3000, 1.0), fake(3000, "kfac", 1.0, [97.6, 98.0]).points)
    monkeypatch.setattr(bench, "outcomes", lambda: recorded + [lb])
    todo = []
    monkeypatch.setattr(bench, "run_all", lambda runs: todo.extend(runs))
    phase_schedule(bench, [3000], list(best))
    names = sorted(r.name for r in todo)
    assert names == sorted([f"b3000_{f}_lr{lr * m:.3g}_cos" for f, lr in best.items() for m in (1, 2, 3)]
                           + [f"b3000_kfaclb_lr{m}_cos" for m in (1, 2, 3)])
    lb3 = next(r for r in todo if r.name == "b3000_kfaclb_lr3_cos")
    assert lb3.flags.startswith("experiment=kfac_large_batch --optimizer-learning-rate 3 ")
    assert "optimizer.schedule=cosine" in lb3.flags and lb3.phase == "schedule"
