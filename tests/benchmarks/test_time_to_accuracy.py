"""benchmarks/time_to_accuracy.py on synthetic metrics: times to targets, the best baselines, ratios, files."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import pytest

from benchmarks.time_to_accuracy import command, main, parse_kfac_recipe
from benchmarks.time_to_accuracy_report import (
    Recipe,
    curve,
    first_hits,
    make_result,
    markdown,
    pick_best,
    ratio,
    write_report,
)

TARGETS = (97.5, 98.0)


def records(points: list[tuple[float, float]], every: int = 100) -> list[dict]:
    """Test records at steps every, 2 every, ... for (train_time, accuracy) points, with an epoch
    record (which the benchmark must ignore) after every sixth."""
    out = []
    for i, (seconds, acc) in enumerate(points, 1):
        out.append({"kind": "test", "step": i * every, "epoch": (i * every - 1) // 600,
                    "epochs_done": i * every / 600, "train_time": seconds, "wall_time": seconds + i,
                    "test_accuracy": acc, "test_objective": 0.1})
        if i % 6 == 0:
            out.append({"epoch": i // 6 - 1, "step": i * every, "train_objective": 0.1, "test_accuracy": 1.0,
                        "wall_time": seconds + i})
    return out


RUNS = {
    Recipe("kfac_lbann", "kfac", "--kfac"): [(5, 96.0), (10, 97.6), (20, 98.1)],
    Recipe("kfac_slow", "kfac", "--kfac --kfac-damping-act 1"): [(25, 96.0), (50, 97.0)],
    Recipe("adam_lr1e-4", "adam", "--optimizer adam"): [(30, 97.5), (60, 98.0), (70, 98.0)],
    Recipe("adam_lr1e-3", "adam", "--optimizer adam"): [(25, 97.6), (50, 97.9), (100, 97.8)],
    Recipe("sgd_lr0.1", "sgd", "--optimizer sgd"): [(50, 96.0), (100, 97.2)],
    Recipe("sgd_momentum0.9_lr0.01", "sgd", "--optimizer momentum"): [(40, 97.0)],
}


@pytest.fixture()
def results():
    return [make_result(recipe, records(points), TARGETS) for recipe, points in RUNS.items()]


def by_name(results, name):
    return next(r for r in results if r.recipe.name == name)


def test_curve_reads_test_records_only_and_first_hits_finds_each_target():
    points = curve(records([(5, 96.0), (10, 97.6), (20, 98.1), (30, 97.0), (40, 98.5), (50, 98.6)]))
    assert [(p.step, p.train_time, p.accuracy) for p in points][:3] == [(100, 5, 96.0), (200, 10, 97.6), (300, 20, 98.1)]
    assert len(points) == 6  # the epoch record (test_accuracy 1.0) is not a point
    hits = first_hits(points, TARGETS)
    assert (hits[97.5].train_time, hits[97.5].step, hits[97.5].epochs) == (10, 200, pytest.approx(1 / 3))
    assert (hits[98.0].train_time, hits[98.0].step) == (20, 300)
    assert first_hits(points, [99.0]) == {99.0: None}


def test_best_adam_is_the_fastest_to_the_highest_target_and_best_sgd_the_best_final(results):
    # adam_lr1e-3 is first to 97.5 but never reaches 98.
    assert pick_best(results, "adam", TARGETS).recipe.name == "adam_lr1e-4"
    assert pick_best(results, "sgd", TARGETS).recipe.name == "sgd_lr0.1"  # neither reached: final 97.2 > 97.0
    assert pick_best(results, "adam", [97.5]).recipe.name == "adam_lr1e-3"
    assert pick_best(results, "kfac", TARGETS).recipe.name == "kfac_lbann"
    assert pick_best(results, "nothing", TARGETS) is None


def test_ties_go_to_the_better_final_accuracy():
    a = make_result(Recipe("a", "adam", ""), records([(10, 98.0), (20, 98.1)]), TARGETS)
    b = make_result(Recipe("b", "adam", ""), records([(10, 98.0), (20, 98.4)]), TARGETS)
    assert pick_best([a, b], "adam", TARGETS) is b


def test_ratios_and_bounds(results):
    kfac, slow = by_name(results, "kfac_lbann"), by_name(results, "kfac_slow")
    adam, sgd = by_name(results, "adam_lr1e-4"), by_name(results, "sgd_lr0.1")
    assert ratio(kfac, adam, 97.5) == "0.33" and ratio(kfac, adam, 98.0) == "0.33"
    assert ratio(kfac, sgd, 97.5) == "< 0.10" and ratio(kfac, sgd, 98.0) == "< 0.20"  # sgd trained 100 s
    assert ratio(slow, adam, 97.5) == "> 1.67"  # K-FAC trained 50 s, Adam got there in 30
    assert ratio(slow, sgd, 98.0) == "-" and ratio(kfac, None, 98.0) == "-"


def test_the_table_has_a_row_per_recipe_with_times_and_ratios(results):
    text = markdown(results, TARGETS, "MLP, 1 rank")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert list(rows) == ["recipe", "kfac_lbann", "kfac_slow", "adam_lr1e-4 (best Adam)", "adam_lr1e-3",
                          "sgd_lr0.1 (best SGD)", "sgd_momentum0.9_lr0.01"]
    assert rows["recipe"].count("time to") == 2 and "K-FAC / best Adam @ 98%" in rows["recipe"]
    cells = [c.strip() for c in rows["kfac_lbann"].strip("|").split("|")]
    # recipe, flags, (time, epochs, step) x 2, steps run, train time, final, best, ratios Adam x 2, SGD x 2
    assert cells[2:] == ["10.0", "0.33", "200", "20.0", "0.50", "300", "300", "20.0", "98.10", "98.10",
                         "0.33", "0.33", "< 0.10", "< 0.20"]
    assert "not reached (best 97.90%)" in rows["adam_lr1e-3"]
    assert rows["adam_lr1e-3"].rstrip(" |").endswith("- | - | - | -")
    assert "Best Adam: adam_lr1e-4." in text and "Best SGD: sgd_lr0.1." in text


def test_write_report_writes_the_table_the_curves_and_a_png(results, tmp_path):
    paths = write_report(results, TARGETS, tmp_path / "out", "MLP, 1 rank")
    assert [p.name for p in paths] == ["time_to_accuracy.md", "time_to_accuracy.csv", "time_to_accuracy.png"]
    with open(paths[1]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(points) for points in RUNS.values())
    assert rows[0] == {"recipe": "kfac_lbann", "family": "kfac", "step": "100", "epochs": "0.1667",
                       "train_time": "5.0", "test_accuracy": "96.0"}
    png = paths[2].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_tables_only_rebuilds_from_the_runs_under_out(tmp_path, capsys):
    points_of = {recipe.name: points for recipe, points in RUNS.items()}
    for name in ("kfac_lbann", "adam_lr1e-4", "sgd_lr0.1"):  # default recipes; the rest did not run
        points = points_of[name]
        run = tmp_path / name / f"20260101_000000_{name}"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(points)) + '{"kind": "te')
    assert main(["--out", str(tmp_path), "--tables-only"]) == 0
    out = capsys.readouterr().out
    assert "adam_lr3e-4: no run under" in out and "kfac_lbann: 97.5% at 10.0s (step 200), 98% at 20.0s" in out
    text = (tmp_path / "time_to_accuracy.md").read_text()
    assert "| kfac_lbann | `--optimizer sgd --optimizer-learning-rate 1e-1 --kfac" in text
    assert "Best Adam: adam_lr1e-4." in text and "Best SGD: sgd_lr0.1." in text
    assert (tmp_path / "time_to_accuracy.png").is_file()


def test_kfac_recipes_from_the_command_line():
    assert parse_kfac_recipe('kfac_lr0.03=--optimizer sgd --optimizer-learning-rate 0.03') == Recipe(
        "kfac_lr0.03", "kfac", "--optimizer sgd --optimizer-learning-rate 0.03 --kfac")
    assert parse_kfac_recipe("k=--kfac --kfac-damping-act 0.1").flags == "--kfac --kfac-damping-act 0.1"
    for bad in ("no_equals", "=--kfac", "name=", "a/b=--kfac"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_kfac_recipe(bad)


def test_the_command_of_a_recipe(tmp_path):
    cmd = command(Recipe("kfac_lbann", "kfac", "--kfac --kfac-damping-act 0.01"), "cnn", 4, tmp_path, 50, 98.0, 10,
                  ["data.max_train_samples=2000"])
    assert cmd[0] == sys.executable and Path(cmd[1]).name == "kfac.py"
    assert cmd[2:] == ["--model", "cnn", "--kfac", "--kfac-damping-act", "0.01", "--nodes", "1", "--procs-per-node",
                       "4", "trainer.epochs=10", "trainer.test_every_steps=50", "trainer.stop_at_test_accuracy=98.0",
                       "trainer.progress=false", f"launcher.experiment_dir={tmp_path / 'kfac_lbann'}",
                       "launcher.job_name=kfac_lbann", "data.max_train_samples=2000"]
