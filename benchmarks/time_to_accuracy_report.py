"""Time to accuracy, the pure part: a recipe, its run's test curve and the first time it reaches
each target, the best run per family, and the report (markdown, CSV, plot) of
``benchmarks/time_to_accuracy.py``.

Everything but the ``write_`` functions is pure.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

FAMILIES = ("kfac", "adam", "sgd")


@dataclass(frozen=True)
class Recipe:
    """One candidate: a name, its family (kfac, adam or sgd) and its kfac.py flags (no --model)."""

    name: str
    family: str
    flags: str


# -- reading a run (pure but for read_metrics) ----------------------------------------------


@dataclass(frozen=True)
class Point:
    """One test of a run: after ``train_time`` seconds of training, at ``step`` (``epochs`` done)."""

    train_time: float
    accuracy: float
    step: int
    epochs: float


@dataclass(eq=False)  # compared (and hashed) by identity
class Result:
    """One recipe's curve and what it reached; ``hits`` maps each target to its first point (or None)."""

    recipe: Recipe
    curve: list[Point]
    hits: dict[float, Optional[Point]] = field(default_factory=dict)
    status: str = "ok"

    @property
    def final(self) -> Optional[float]:
        return self.curve[-1].accuracy if self.curve else None

    @property
    def best(self) -> Optional[float]:
        return max(p.accuracy for p in self.curve) if self.curve else None

    @property
    def total_time(self) -> Optional[float]:
        return self.curve[-1].train_time if self.curve else None

    @property
    def steps(self) -> Optional[int]:
        return self.curve[-1].step if self.curve else None


def curve(records: Sequence[Mapping[str, Any]]) -> list[Point]:
    """The ``"kind": "test"`` records of a metrics.jsonl as points, in order of step."""
    points = [Point(float(r["train_time"]), float(r["test_accuracy"]), int(r["step"]),
                    float(r.get("epochs_done", r.get("epoch", 0))))
              for r in records if r.get("kind") == "test"]
    return sorted(points, key=lambda p: p.step)


def first_hits(points: Sequence[Point], targets: Sequence[float]) -> dict[float, Optional[Point]]:
    """For each target, the first point whose accuracy is >= it (None: never reached)."""
    return {t: next((p for p in points if p.accuracy >= t), None) for t in targets}


def make_result(recipe: Recipe, records: Sequence[Mapping[str, Any]], targets: Sequence[float],
                status: str = "ok") -> Result:
    points = curve(records)
    return Result(recipe, points, first_hits(points, targets), status)


def pick_best(results: Sequence[Result], family: str, targets: Sequence[float]) -> Optional[Result]:
    """The family's fastest to the highest target some member reached (ties: the better final
    accuracy), going down the targets; when none reached any, the best final accuracy."""
    members = [r for r in results if r.recipe.family == family and r.curve]
    if not members:
        return None
    for target in sorted(targets, reverse=True):
        reached = [r for r in members if r.hits.get(target) is not None]
        if reached:
            return min(reached, key=lambda r: (r.hits[target].train_time, -(r.final or 0.0)))
    return max(members, key=lambda r: r.final or 0.0)


def ratio(result: Result, base: Optional[Result], target: float) -> str:
    """``result``'s time to ``target`` over ``base``'s; a bound when only one reached it."""
    if base is None or result is base:
        return "-"
    mine, theirs = result.hits.get(target), base.hits.get(target)
    if mine is not None and theirs is not None:
        return f"{mine.train_time / theirs.train_time:.2f}" if theirs.train_time > 0 else "-"
    if mine is not None and base.total_time:  # the base trained this long without reaching it
        return f"< {mine.train_time / base.total_time:.2f}"
    if theirs is not None and result.total_time and theirs.train_time > 0:
        return f"> {result.total_time / theirs.train_time:.2f}"
    return "-"


# -- the report (pure text; the writers below do the I/O) --------------------------------------


def _hit_cells(result: Result, target: float) -> list[str]:
    hit = result.hits.get(target)
    if hit is None:
        best = f"{result.best:.2f}%" if result.best is not None else "no test"
        return [f"not reached (best {best})", "-", "-"]
    return [f"{hit.train_time:.1f}", f"{hit.epochs:.2f}", str(hit.step)]


def markdown(results: Sequence[Result], targets: Sequence[float], title: str, notes: Sequence[str] = ()) -> str:
    """The table: per recipe, time (s), epochs and step at each target, steps run, final accuracy,
    and for K-FAC recipes the ratios of its times to the best Adam's and the best SGD's."""
    targets = sorted(targets)
    best = {f: pick_best(results, f, targets) for f in ("adam", "sgd")}
    head = ["recipe", "flags"]
    for t in targets:
        head += [f"time to {t:g}% s", "epochs", "step"]
    head += ["steps run", "train time s", "final acc %", "best acc %"]
    head += [f"K-FAC / best {f.replace('adam', 'Adam').replace('sgd', 'SGD')} @ {t:g}%"
             for f in ("adam", "sgd") for t in targets]
    lines = [f"## {title}", "", *notes, "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for fam in FAMILIES:
        for r in (r for r in results if r.recipe.family == fam):
            label = r.recipe.name + (" (best Adam)" if r is best["adam"] else " (best SGD)" if r is best["sgd"] else "")
            if r.status != "ok":
                label += f" ({r.status})"
            cells = [label, f"`{r.recipe.flags}`"]
            for t in targets:
                cells += _hit_cells(r, t)
            cells += [str(r.steps) if r.steps is not None else "-",
                      f"{r.total_time:.1f}" if r.total_time is not None else "-",
                      f"{r.final:.2f}" if r.final is not None else "-",
                      f"{r.best:.2f}" if r.best is not None else "-"]
            cells += [ratio(r, best[f], t) if fam == "kfac" else "-" for f in ("adam", "sgd") for t in targets]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for fam, label in (("adam", "Adam"), ("sgd", "SGD")):
        b = best[fam]
        lines.append(f"Best {label}: {b.recipe.name if b else 'none (no run)'}.")
    lines.append("")
    return "\n".join(lines)


def csv_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Every curve point: recipe, family, step, epochs, train_time, test_accuracy."""
    return [{"recipe": r.recipe.name, "family": r.recipe.family, "step": p.step, "epochs": round(p.epochs, 4),
             "train_time": round(p.train_time, 4), "test_accuracy": p.accuracy}
            for r in results for p in r.curve]


def write_report(results: Sequence[Result], targets: Sequence[float], out: Path, title: str,
                 notes: Sequence[str] = (), ylim: tuple[float, float] = (95.0, 99.5)) -> list[Path]:
    """Writes time_to_accuracy.md, .csv and .png into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "time_to_accuracy.md"
    md.write_text(markdown(results, targets, title, notes))
    table = out / "time_to_accuracy.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["recipe", "family", "step", "epochs", "train_time", "test_accuracy"])
        writer.writeheader()
        writer.writerows(csv_rows(results))
    png = out / "time_to_accuracy.png"
    write_plot(results, targets, png, title, ylim)
    return [md, table, png]


def write_plot(results: Sequence[Result], targets: Sequence[float], path: Path, title: str,
               ylim: tuple[float, float]) -> None:
    """Test accuracy against training seconds, one line per recipe (best Adam/SGD and K-FAC bold)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    best = {pick_best(results, f, targets) for f in ("adam", "sgd")}
    cmaps = {"kfac": plt.get_cmap("Reds"), "adam": plt.get_cmap("Blues"), "sgd": plt.get_cmap("Greens")}
    fig, ax = plt.subplots(figsize=(10, 6))
    for fam in FAMILIES:
        members = [r for r in results if r.recipe.family == fam and r.curve]
        for i, r in enumerate(members):
            strong = fam == "kfac" or r in best
            color = cmaps[fam](0.45 + 0.5 * (i + 1) / (len(members) + 1))
            ax.plot([p.train_time for p in r.curve], [p.accuracy for p in r.curve], marker=".", markersize=3,
                    color=color, linewidth=2.2 if strong else 0.9, alpha=1.0 if strong else 0.6,
                    label=r.recipe.name + (" (best)" if r in best else ""))
    for t in targets:
        ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
        ax.text(ax.get_xlim()[1], t, f" {t:g}%", va="center", fontsize=8, color="grey")
    ax.set_ylim(*ylim)
    ax.set_xlim(left=0)
    ax.set_xlabel("training wall-clock, s (rank 0, test evaluations excluded)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
