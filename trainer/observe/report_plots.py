"""The report's plots: test accuracy and training objective against epochs and time, one legend
below the panels, and the heat map of a 2-D sweep (matplotlib, imported when drawing)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainer.observe.lbann_log import g
from trainer.observe.runs import Run, test_points


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
