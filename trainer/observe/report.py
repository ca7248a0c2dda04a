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
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from launcher.workdir import METRICS_FILE, epoch_records, parse_metrics
from trainer.observe.lbann_log import g

METRICS = METRICS_FILE
# Keys that differ between runs without making them different experiments.
# The job name is in the work dir's name, which names runs that differ in nothing else.
IGNORED = {"launcher.experiment_dir", "launcher.job_name", "data.dir", "trainer.progress", "trainer.tensorboard",
           "kfac.print_time", "kfac.print_matrix", "kfac.print_matrix_summary"}
ALIASES = {"optimizer.name": "optimizer", "optimizer.learning_rate": "lr", "kfac.enabled": "kfac",
           "model.name": "model", "trainer.epochs": "epochs", "trainer.mini_batch_size": "mb"}
COLUMNS = ("run", "final test acc %", "best test acc %", "final train obj", "epochs", "total time s")
CSV_FIELDS = ("final_test_accuracy", "best_test_accuracy", "final_train_objective", "epochs", "total_time")


class ReportError(Exception):
    """Bad input to the report: one line for the user."""


@dataclass
class Run:
    """One run: its work dir, per-epoch records and (flattened) config."""

    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    complete: bool = False  # the config is a whole composed config, not just overrides


# -- reading (thin I/O) ------------------------------------------------------------------


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_metrics(paths: Sequence[str | Path]) -> list[Path]:
    """The metrics.jsonl files of the given work dirs, sweep dirs or files, in natural order.

    Raises:
        ReportError: For a path that does not exist.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"no such file or directory: {p}")
        if p.is_file():
            candidates = [p]
        elif (p / METRICS).is_file():
            candidates = [p / METRICS]
        else:
            candidates = sorted(p.rglob(METRICS), key=_natural)
        found += [c for c in candidates if c not in found]
    return found


def parse_records(text: str) -> list[dict[str, Any]]:
    """The per-epoch JSON objects of a metrics.jsonl text (blank, partial and test lines skipped)."""
    return epoch_records(parse_metrics(text))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; one-element lists (dampings) become their element."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = value[0] if len(value) == 1 else tuple(value)
        else:
            flat[name] = value
    return flat


def overrides_config(overrides: Sequence[str]) -> dict[str, Any]:
    """Hydra overrides as a flat config: ``optimizer=sgd`` is the group choice ``optimizer.name``."""
    config: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.lstrip("+~").partition("=")
        if not sep:
            continue
        value = yaml.safe_load(text) if text else None
        if "." not in key and isinstance(value, str):
            key = f"{key}.name"
        config.update(flatten({key: value}))
    return config


def read_config(work_dir: Path) -> dict[str, Any]:
    """The flattened config of a work dir: .hydra/config.yaml, config.yaml, or the overrides."""
    for name in (".hydra/config.yaml", "config.yaml"):
        path = work_dir / name
        if path.is_file():
            tree = yaml.safe_load(path.read_text()) or {}
            if isinstance(tree, Mapping):
                return flatten(tree)
    path = work_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        return overrides_config(yaml.safe_load(path.read_text()) or [])
    return {}


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Reads every run under ``paths``; runs with no complete record are skipped.

    Raises:
        ReportError: For a missing path, or when no metrics are found.
    """
    runs = []
    for metrics in find_metrics(paths):
        records = parse_records(metrics.read_text())
        if records:
            complete = any((metrics.parent / n).is_file() for n in (".hydra/config.yaml", "config.yaml"))
            runs.append(Run(metrics.parent, records, read_config(metrics.parent), complete))
    if not runs:
        raise ReportError(f"no {METRICS} with records found in {', '.join(map(str, paths))}")
    return runs


# -- naming and the table (pure) ---------------------------------------------------------


def _relevant(run: Run, key: str) -> bool:
    # With K-FAC off, its options don't describe the run.
    return not (key.startswith("kfac.") and key != "kfac.enabled" and run.config.get("kfac.enabled") is False)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values differ between runs, in config order.

    A key missing from a run's whole composed config (that config predates the key) says
    nothing about how the runs differ, so it is left out; a run known only by its overrides
    lacks every key it did not override, and those still count.
    """
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys and k not in IGNORED]
    keys = [k for k in keys if all(k in r.config for r in runs if r.complete)]
    return [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]


def format_value(key: str, value: Any) -> str:
    """A config value as it appears in a run name."""
    if key == "kfac.enabled":
        return "on" if value else "off"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return g(value)
    if isinstance(value, tuple):
        return ",".join(format_value(key, v) for v in value)
    return str(value)


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Short, unambiguous names: ``optimizer.learning_rate`` -> ``lr``, ``kfac.damping_act`` -> ``damping_act``."""
    names = {k: ALIASES.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {k: (k if n in clash else n) for k, n in names.items()}


def run_labels(runs: Sequence[Run]) -> list[str]:
    """One name per run, from the config values that differ (else the directory name)."""
    keys = varying_keys(runs)
    names = short_names(keys)
    labels = []
    for run in runs:
        parts = [f"{names[k]}={format_value(k, run.config.get(k))}" for k in keys
                 if k in run.config and _relevant(run, k)]
        labels.append(" ".join(parts) or run.path.name)
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} ({runs[i].path.name})"
    return labels


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
        row.update({k: format_value(k, run.config[k]) if k in run.config and _relevant(run, k) else "" for k in keys})
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


def test_points(records: Sequence[Mapping[str, Any]]) -> int:
    """How many per-epoch records of a run hold a test accuracy."""
    return sum(r.get("test_accuracy") is not None for r in records)


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


def _points(records: Sequence[Mapping[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x] + (1 if x == "epoch" else 0), r[y]) for r in records if r.get(y) is not None and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


# The curves' figure: its width, and how many characters of legend text (at fontsize "small") fit
# across it with room to spare; a legend line never gets longer than WRAP characters.
CURVES_WIDTH_IN = 11.0
LEGEND_CHARS = 130
WRAP = 100


def legend_entries(labels: Sequence[str], counts: Sequence[int]) -> tuple[list[str], int]:
    """The legend's texts (wrapped, with a note for runs tested fewer than twice) and its columns.

    As many columns as fit ``LEGEND_CHARS`` characters across (at most 4), so the legend below
    the axes is never wider than the figure.
    """
    notes = {0: " [no test points]", 1: " [1 test point]"}
    texts = [textwrap.fill(label + notes.get(n, ""), WRAP, break_long_words=True, break_on_hyphens=False)
             for label, n in zip(labels, counts, strict=True)]
    longest = max((len(line) for t in texts for line in t.splitlines()), default=1)
    ncols = max(1, min(len(texts), 4, LEGEND_CHARS // (longest + 6)))
    return texts, ncols


CURVES = (("epoch", "epochs completed", "curves_by_epoch.png"),
          ("wall_time", "wall-clock time since start (s)", "curves_by_time.png"))


def curves_figure(runs: Sequence[Run], labels: Sequence[str], x: str, xlabel: str) -> Any:
    """Test accuracy and training objective against ``x`` (``epoch`` or ``wall_time``): a Figure.

    One legend for both panels, below them. A run tested once is a large marker, not a curve,
    and the legend says so, as it does for a run never tested.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    counts = [test_points(run.records) for run in runs]
    texts, ncols = legend_entries(labels, counts)
    rows = [texts[i:i + ncols] for i in range(0, len(texts), ncols)]
    legend_lines = sum(max(t.count("\n") + 1 for t in row) for row in rows)
    fig = Figure(figsize=(CURVES_WIDTH_IN, 4.5 + 0.17 * legend_lines), layout="constrained")
    acc_ax, obj_ax = fig.subplots(1, 2)
    objectives = []
    handles = []
    for i, run in enumerate(runs):
        style = {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}
        for ax, y, marker in ((acc_ax, "test_accuracy", "o"), (obj_ax, "train_objective", ".")):
            xs, ys = _points(run.records, x, y)
            if len(xs) == 1:  # a lone point: big enough to see, edged to stand out from the curves
                line, = ax.plot(xs, ys, marker="D", markersize=9, markeredgecolor="black", **style)
            else:
                line, = ax.plot(xs, ys, marker=marker, **style)
            if y == "test_accuracy":
                handles.append(line)
            else:
                objectives += ys
    if not any(counts):
        acc_ax.text(0.5, 0.5, "no run has test points", transform=acc_ax.transAxes, ha="center",
                    va="center", color="0.4")
    if objectives and min(objectives) > 0 and max(objectives) / min(objectives) > 10:
        obj_ax.set_yscale("log")
    acc_ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title="Test accuracy")
    obj_ax.set(xlabel=xlabel, ylabel="training objective", title="Training objective")
    for ax in (acc_ax, obj_ax):
        ax.grid(True, alpha=0.3)
        if x == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(handles, texts, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)
    return fig


def plot_curves(runs: Sequence[Run], labels: Sequence[str], out: Path) -> list[Path]:
    """Writes test accuracy and training objective against epochs and against wall-clock time."""
    paths = []
    for x, xlabel, name in CURVES:
        paths.append(out / name)
        curves_figure(runs, labels, x, xlabel).savefig(paths[-1], dpi=100)
    return paths


def plot_heatmap(grid: tuple[str, str, list[float], list[float], list[list[float]]], out: Path) -> Path:
    """Writes the final test accuracy of a 2-D sweep as an annotated heat map."""
    from matplotlib.figure import Figure

    rk, ck, rows, cols, values = grid
    fig = Figure(figsize=(1.3 * len(cols) + 3, 1.0 * len(rows) + 2.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [g(c) for c in cols])
    ax.set_yticks(range(len(rows)), [g(r) for r in rows])
    ax.set(xlabel=ck, ylabel=rk, title="Final test accuracy (%)")
    finite = [v for line in values for v in line if not math.isnan(v)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, line in enumerate(values):
        for j, v in enumerate(line):
            text = "no result" if math.isnan(v) else f"{v:.2f}"  # no run, or a run never tested
            # A missing cell is blank (the axes' white): its text is black.
            ax.text(j, i, text, ha="center", va="center", color="black" if math.isnan(v) or v > middle else "white")
    fig.colorbar(image, ax=ax)
    path = out / "heatmap_test_accuracy.png"
    fig.savefig(path, dpi=100)
    return path


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
