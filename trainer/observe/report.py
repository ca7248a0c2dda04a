"""Compare runs: a table (printed and CSV) and plots from their metrics.jsonl files.

    python3 -m trainer.report experiments/20250101_120000_kfac experiments/20250101_121500_kfac
    python3 -m trainer.report experiments/20250101_130000_kfac_sweep --out report/

A work dir holds ``metrics.jsonl`` and its config (``.hydra/config.yaml``, or the launcher's
``config.yaml``, or only ``.hydra/overrides.yaml``); a sweep dir holds numbered work dirs. Any
directory is searched for ``metrics.jsonl`` files below it. Runs are named by the config values
that differ between them. Written to ``--out``: ``runs.csv``, ``curves_by_epoch.png`` and
``curves_by_time.png`` (test accuracy and training objective), and, for a 2-D sweep (exactly
two numeric keys vary), ``heatmap_test_accuracy.png``. The curves share one legend, below the
panels. A run with fewer than two test points has no test-accuracy curve: the printed report
says so after the table, and the plots draw its one point as a large diamond, "[1 test point]"
in the legend (or "[no test points]").

Everything but ``main`` and the ``write_``/``plot_`` functions is pure.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from trainer.observe.report_plots import plot_curves, plot_heatmap
from trainer.observe.runs import ReportError, Run, format_value, load_runs, relevant, run_labels, varying_keys

COLUMNS = ("run", "final test acc %", "best test acc %", "final train obj", "epochs", "total time s")
CSV_FIELDS = ("final_test_accuracy", "best_test_accuracy", "final_train_objective", "epochs", "total_time")


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Optional[float]]:
    """Final and best test accuracy, final training objective, epochs and total time of a run."""
    tested = [r["test_accuracy"] for r in records if r.get("test_accuracy") is not None]
    last = records[-1]
    return {
        "final_test_accuracy": tested[-1] if tested else None,
        "best_test_accuracy": max(tested) if tested else None,
        "final_train_objective": last.get("train_objective"),
        "epochs": last.get("epoch", len(records) - 1) + 1,
        "total_time": last.get("wall_time"),
    }


def table_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run: name, path, the differing config values (blank where they don't apply) and the summary."""
    keys = varying_keys(runs)
    rows = []
    for run, label in zip(runs, run_labels(runs), strict=True):
        row: dict[str, Any] = {"run": label, "path": str(run.path)}
        row.update({k: format_value(k, run.config[k]) if k in run.config and relevant(run, k) else "" for k in keys})
        row.update(summarize(run.records))
        rows.append(row)
    return rows


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as an aligned text table (accuracies in %, objective to 4 digits, time in s)."""
    body = [[r["run"], _cell(r["final_test_accuracy"], ".2f"), _cell(r["best_test_accuracy"], ".2f"),
             _cell(r["final_train_objective"], ".4g"), str(r["epochs"]), _cell(r["total_time"], ".1f")]
            for r in rows]
    widths = [max(len(line[i]) for line in [list(COLUMNS), *body]) for i in range(len(COLUMNS))]
    lines = []
    for line in [list(COLUMNS), *body]:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

def few_test_points_notes(runs: Sequence[Run], labels: Sequence[str]) -> list[str]:
    """One line per run tested fewer than twice: it has no test-accuracy curve, at most a marker."""
    notes = []
    for run, label in zip(runs, labels, strict=True):
        tested = [r for r in run.records if r.get("test_accuracy") is not None]
        if len(tested) == 1:
            where = f"after epoch {tested[0]['epoch'] + 1}" if "epoch" in tested[0] else "once"
            notes.append(f"note: {label}: 1 test point ({where}), too few for a test-accuracy curve; "
                         "plotted as a single marker")
        elif not tested:
            notes.append(f"note: {label}: no test points, nothing to plot for test accuracy")
    return notes


def sweep_grid(runs: Sequence[Run]) -> Optional[tuple[str, str, list[float], list[float], list[list[float]]]]:
    """For a 2-D sweep, ``(row key, column key, row values, column values, final test accuracy)``.

    A 2-D sweep is exactly two varying keys, both numeric in every run; missing cells are NaN.
    Returns None for anything else.
    """
    keys = varying_keys(runs)
    numeric = all(isinstance(r.config.get(k), (int, float)) and not isinstance(r.config.get(k), bool)
                  for r in runs for k in keys)
    if len(keys) != 2 or not numeric:
        return None
    rk, ck = keys
    rows = sorted({float(r.config[rk]) for r in runs})
    cols = sorted({float(r.config[ck]) for r in runs})
    grid = [[math.nan] * len(cols) for _ in rows]
    for run in runs:
        acc = summarize(run.records)["final_test_accuracy"]
        grid[rows.index(float(run.config[rk]))][cols.index(float(run.config[ck]))] = math.nan if acc is None else acc
    return rk, ck, rows, cols, grid

# -- writing (thin I/O) ------------------------------------------------------------------


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Writes the rows with full-precision numbers; empty cells for missing values."""
    fields = list(rows[0]) if rows else ["run", "path", *CSV_FIELDS]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})

def report(paths: Sequence[str | Path], out: Path) -> tuple[str, list[Path]]:
    """Reads the runs, writes the CSV and plots into ``out``; returns the table (and a note per
    run tested fewer than twice) and the files."""
    runs = load_runs(paths)
    rows = table_rows(runs)
    labels = [r["run"] for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "runs.csv")
    files = [out / "runs.csv", *plot_curves(runs, labels, out)]
    grid = sweep_grid(runs)
    if grid is not None:
        files.append(plot_heatmap(grid, out))
    return "\n".join([format_table(rows), *few_test_points_notes(runs, labels)]), files


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python3 -m trainer.report``: prints the table and where the files went."""
    parser = argparse.ArgumentParser(prog="python3 -m trainer.report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="work dirs, sweep dirs or metrics.jsonl files")
    parser.add_argument("--out", help="where runs.csv and the plots go (default: the one directory "
                        "given, else the current directory)")
    args = parser.parse_args(argv)
    default = Path(args.paths[0]) if len(args.paths) == 1 and Path(args.paths[0]).is_dir() else Path(".")
    try:
        table, files = report(args.paths, Path(args.out) if args.out else default)
    except ReportError as err:
        print(f"trainer.report: error: {err}", file=sys.stderr)
        return 2
    print(table)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
