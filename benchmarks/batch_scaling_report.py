"""The batch-scaling benchmark's results: runs and their outcomes, the best run per batch, the
critical batch size, and the report (markdown, CSV, plot). Pure but for the files it writes;
``benchmarks/batch_scaling.py`` runs the runs."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from benchmarks.time_to_accuracy_report import Point, first_hits

TARGETS = (97.5, 98.0)
OBJECTIVES = (1e-2, 1e-3)
FAMILIES = ("kfac", "adam", "momentum")
LABELS = {"kfac": "K-FAC", "adam": "Adam", "momentum": "momentum SGD"}
# The phases whose runs compete for "best at a batch" (levers and objective runs are reported apart).
CURVE_PHASES = ("lr", "schedule", "large_batch")


@dataclass(frozen=True)
class Run:
    """One kfac.py run: its batch, family, a name unique in the benchmark, and its flags."""

    name: str
    batch: int
    family: str
    flags: str
    lr: float
    phase: str = "lr"
    note: str = ""  # what a lever run changes, for the report

    def as_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "family": self.family, "flags": self.flags, "lr": self.lr, "phase": self.phase,
                "note": self.note}


@dataclass
class Outcome:
    """What a run reached: its test curve, first hits of each target, its best accuracy, its status
    and its full-train objective (first hit of each of ``OBJECTIVES``, and ``"curve"``)."""

    run: Run
    points: list[Point]
    hits: dict[float, Optional[Point]]
    status: str
    objective: dict[Any, Any]
    best: Optional[float] = None

    @classmethod
    def of(cls, run: Run, points: Sequence[Point], status: str = "ok",
           objective_curve: Sequence[Mapping[str, float]] = ()) -> Outcome:
        points = sorted(points, key=lambda p: p.step)
        return cls(run, list(points), first_hits(points, TARGETS), status, objective_hits(objective_curve),
                   max((p.accuracy for p in points), default=None))

    def steps_to(self, target: float) -> Optional[int]:
        hit = self.hits.get(target)
        return hit.step if hit is not None else None

    def seconds_per_step(self) -> Optional[float]:
        last = self.points[-1] if self.points else None
        return last.train_time / last.step if last is not None and last.step else None

    def as_json(self) -> dict[str, Any]:
        """The run's summary as stored in the committed state file: its test and objective curves."""
        return {**self.run.as_json(), "status": self.status,
                "curve": [[p.step, round(p.epochs, 4), round(p.train_time, 3), p.accuracy] for p in self.points],
                "objective_curve": [[p["step"], round(p["train_time"], 3), p["objective"]]
                                    for p in self.objective.get("curve", [])]}

    @classmethod
    def from_json(cls, name: str, v: Mapping[str, Any]) -> Outcome:
        """The inverse of ``as_json``; an entry with ``hits`` and ``best`` but no curve (a run whose
        curve was not kept) gives those hits and that best."""
        run = Run(name, v["batch"], v["family"], v["flags"], v["lr"], v.get("phase", "lr"), v.get("note", ""))
        if v.get("curve") is None:
            hits = {t: (Point(h[2], t, h[0], h[1]) if (h := v["hits"].get(f"{t:g}")) else None) for t in TARGETS}
            return cls(run, [], hits, v["status"], objective_hits(()), v.get("best"))
        points = [Point(float(t), float(a), int(s), float(e)) for s, e, t, a in v["curve"]]
        objective = [{"step": int(s), "train_time": float(t), "objective": float(o)}
                     for s, t, o in v.get("objective_curve", [])]
        return cls.of(run, points, v["status"], objective)


def objective_hits(curve: Sequence[Mapping[str, float]]) -> dict[Any, Any]:
    """The first point of the full-train objective curve at or below each of ``OBJECTIVES``."""
    out: dict[Any, Any] = {v: next((p for p in curve if p["objective"] <= v), None) for v in OBJECTIVES}
    out["curve"] = list(curve)
    return out


# -- choosing (pure) ----------------------------------------------------------------------------


def rank_key(o: Outcome) -> tuple:
    """Sort key, smaller is better: steps to 98%, then to 97.5%, then the best accuracy."""
    s98, s975 = o.steps_to(98.0), o.steps_to(97.5)
    return (s98 is None, s98 or 0, s975 is None, s975 or 0, -(o.best or 0.0))


def best_of(outcomes: Iterable[Outcome]) -> Optional[Outcome]:
    done = [o for o in outcomes if o.best is not None]
    return min(done, key=rank_key) if done else None


def fastest_to(outcomes: Iterable[Outcome], target: float) -> Optional[Outcome]:
    """The run with the fewest steps to ``target`` (then fewest seconds); none reached it: ``best_of``."""
    outcomes = list(outcomes)
    hit = [o for o in outcomes if o.hits.get(target) is not None]
    if not hit:
        return best_of(outcomes)
    return min(hit, key=lambda o: (o.hits[target].step, o.hits[target].train_time))


def steps_curve(outcomes: Sequence[Outcome], family: str, target: float,
                batches: Sequence[int]) -> dict[int, Optional[int]]:
    """Per batch, the family's fewest steps to ``target`` over all its runs (None: none reached it)."""
    out = {}
    for b in batches:
        steps = [o.steps_to(target) for o in outcomes if o.run.family == family and o.run.batch == b
                 and o.run.phase in CURVE_PHASES]
        steps = [s for s in steps if s is not None]
        out[b] = min(steps) if steps else None
    return out


def critical_batch(steps: Mapping[int, Optional[int]]) -> tuple[Optional[int], str]:
    """The critical batch and how it was found.

    Between consecutive measured batches b1 < b2, doubling saves a third of the steps when
    S(b2)/S(b1) <= (2/3)^log2(b2/b1). The critical batch is the first b1 where that fails (a
    target not reached at b2 fails it); when it never fails it is at least the largest batch.
    """
    known = sorted(b for b, s in steps.items() if s is not None)
    if not known:
        return None, "target never reached"
    batches = sorted(steps)
    for b1, b2 in zip(batches, batches[1:], strict=False):
        s1, s2 = steps[b1], steps[b2]
        if s1 is None:
            continue
        if s2 is None or s2 / s1 > (2 / 3) ** math.log2(b2 / b1):
            return b1, "measured"
    return known[-1], "at least (still scaling at the largest batch)"


# -- the report ---------------------------------------------------------------------------------


def _cell(o: Optional[Outcome], target: float) -> str:
    if o is None:
        return "-"
    hit = o.hits.get(target)
    if hit is None:
        return f"never (best {o.best:.2f}%)" if o.best is not None else "no test"
    return f"{hit.step} / {hit.epochs:.1f} / {hit.train_time:.0f}"


def markdown(outcomes: Sequence[Outcome], batches: Sequence[int], settings: Mapping[str, Any]) -> str:
    lines = ["# Steps to accuracy against global batch size (MLP, real MNIST, 1 rank)", "",
             f"Each cell: steps / epochs / training seconds to the target for the family's run with the fewest "
             f"steps to it at that batch "
             f"(tuned over the grid in `benchmarks/batch_scaling.py`: {settings.get('grid_note', '')}). "
             f"Tested every max(1, round(5000/batch)) steps; runs stop at 98% or after the epochs of `EPOCHS`. "
             f"{settings.get('jobs', 1)} runs at a time on {settings.get('cpu_count')} cores "
             f"({settings.get('threads', 1)} thread(s) each), so seconds compare within this table only. "
             f"The ratios are of the fewest steps and of the fewest seconds over each family's runs.", ""]
    for target in TARGETS:
        lines += [f"## To {target:g}% test accuracy", "",
                  "| batch | " + " | ".join(LABELS[f] for f in FAMILIES)
                  + " | K-FAC / best first-order: steps | seconds |", "|---:|" + "---|" * len(FAMILIES) + "---:|---:|"]
        for b in batches:
            cells, best = [], {}
            for fam in FAMILIES:
                best[fam] = fastest_to((o for o in outcomes if o.run.batch == b and o.run.family == fam
                                        and o.run.phase in CURVE_PHASES), target)
                label = "" if best[fam] is None else f" (`{best[fam].run.name}`)"
                cells.append(_cell(best[fam], target) + label)
            lines.append(f"| {b} | " + " | ".join(cells) + " | " + " | ".join(_ratios(outcomes, b, target)) + " |")
        lines += [""]
        for fam in FAMILIES:
            crit, how = critical_batch(steps_curve(outcomes, fam, target, batches))
            lines.append(f"- critical batch of {LABELS[fam]} at {target:g}%: {crit if crit else '-'} ({how})")
        lines.append("")
    lines += _lever_lines(outcomes) + _objective_lines(outcomes)
    lines += ["## Every run", "", "| run | phase | flags | steps to 97.5% | steps to 98% | best % | status |",
              "|---|---|---|---:|---:|---:|---|"]
    for o in sorted(outcomes, key=lambda o: (o.run.batch, o.run.family, o.run.phase, o.run.lr)):
        lines.append(f"| {o.run.name} | {o.run.phase} | `{o.run.flags}` | {o.steps_to(97.5) or '-'} | "
                     f"{o.steps_to(98.0) or '-'} | {o.best or 0:.2f} | {o.status} |")
    return "\n".join(lines) + "\n"


def _fastest(outcomes: Iterable[Outcome], target: float, key: str) -> Optional[float]:
    """The fewest steps (key "step") or seconds ("train_time") to ``target`` over ``outcomes``."""
    values = [getattr(o.hits[target], key) for o in outcomes if o.hits.get(target) is not None]
    return min(values) if values else None


def _ratios(outcomes: Sequence[Outcome], batch: int, target: float) -> list[str]:
    """K-FAC's fewest steps and seconds to ``target`` at ``batch`` over the best first-order family's."""
    at = [o for o in outcomes if o.run.batch == batch and o.run.phase in CURVE_PHASES]
    out = []
    for key in ("step", "train_time"):
        kfac = _fastest((o for o in at if o.run.family == "kfac"), target, key)
        first = _fastest((o for o in at if o.run.family != "kfac"), target, key)
        out.append(f"{kfac / first:.2f}" if kfac and first else "-")
    return out


def _lever_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """One table per batch: each lever run against the K-FAC recipe it changes."""
    levers = [o for o in outcomes if o.run.phase == "lever"]
    lines = []
    for b in sorted({o.run.batch for o in levers}):
        lines += [f"## K-FAC levers at batch {b}, one at a time", "",
                  "| run | change | 97.5%: step / s | 98%: step / s | best % | s / step |", "|---|---|---:|---:|---:|---:|"]
        base = best_of(o for o in outcomes if o.run.batch == b and o.run.family == "kfac" and o.run.phase == "lr")
        for o in ([base] if base is not None else []) + [o for o in levers if o.run.batch == b]:
            cells = [f"{h.step} / {h.train_time:.0f}" if (h := o.hits.get(t)) else "never" for t in TARGETS]
            per_step = o.seconds_per_step()
            change = "(the base: best constant rate)" if o is base else o.run.note or o.run.flags
            lines.append(f"| {o.run.name} | {change} | " + " | ".join(cells)
                         + f" | {o.best or 0:.2f} | {f'{per_step:.3f}' if per_step else '-'} |")
        lines.append("")
    return lines


def _objective_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """Steps and seconds until the full-train objective first reaches each of ``OBJECTIVES``."""
    objective = sorted((o for o in outcomes if o.run.phase == "objective"), key=lambda o: (o.run.batch, o.run.family))
    if not objective:
        return []
    lines = ["## Time to a training objective (full training set)", "",
             "| batch | family | run | " + " | ".join(f"to {v:g}: step / s" for v in OBJECTIVES) + " | lowest |",
             "|---:|---|---|" + "---:|" * (len(OBJECTIVES) + 1)]
    for o in objective:
        cells = [f"{h['step']} / {h['train_time']:.0f}" if (h := o.objective.get(v)) else "never" for v in OBJECTIVES]
        low = min((p["objective"] for p in o.objective.get("curve", [])), default=None)
        lines.append(f"| {o.run.batch} | {LABELS[o.run.family]} | {o.run.name} | " + " | ".join(cells)
                     + f" | {f'{low:.3g}' if low is not None else '-'} |")
    lines.append("")
    for b in sorted({o.run.batch for o in objective}):
        for v in OBJECTIVES:
            times = {f: [h["train_time"] for o in objective if o.run.batch == b and o.run.family == f
                         and (h := o.objective.get(v))] for f in FAMILIES}
            first = min((t for f in FAMILIES if f != "kfac" for t in times[f]), default=None)
            kfac = min(times["kfac"], default=None)
            ratio = f"{kfac / first:.2f}" if kfac and first else "-"
            lines.append(f"- batch {b}, objective {v:g}: K-FAC seconds / best first-order seconds = {ratio}")
    lines.append("")
    return lines


def write_csv(outcomes: Sequence[Outcome], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "phase", "batch", "family", "lr", "steps_to_97.5", "steps_to_98",
                    "time_to_97.5", "time_to_98", "best_accuracy", "status"])
        for o in outcomes:
            h = [o.hits.get(t) for t in TARGETS]
            w.writerow([o.run.name, o.run.phase, o.run.batch, o.run.family, o.run.lr,
                        *(p.step if p else "" for p in h), *(round(p.train_time, 2) if p else "" for p in h),
                        o.best if o.best is not None else "", o.status])


def write_plot(outcomes: Sequence[Outcome], batches: Sequence[int], path: Path) -> None:
    """Steps to each target against batch, log-log, with the perfect-scaling line and critical batches."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    colors = {"kfac": "tab:red", "adam": "tab:blue", "momentum": "tab:green"}
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(12, 5), sharey=True)
    for ax, target in zip(axes, TARGETS, strict=True):
        for fam in FAMILIES:
            steps = steps_curve(outcomes, fam, target, batches)
            xs = [b for b in batches if steps[b] is not None]
            if not xs:
                continue
            # NaN where the target was not reached: the line breaks there rather than bridging it.
            ax.plot(batches, [steps[b] if steps[b] is not None else math.nan for b in batches], marker="o",
                    color=colors[fam], label=LABELS[fam])
            crit, _ = critical_batch(steps)
            if crit is not None:
                ax.scatter([crit], [steps[crit]], s=220, facecolors="none", edgecolors=colors[fam], linewidths=2)
            first = xs[0]
            ax.plot([first, batches[-1]], [steps[first], steps[first] * first / batches[-1]], linestyle=":",
                    color=colors[fam], linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("global batch size")
        ax.set_title(f"steps to {target:g}% test accuracy (best tuned run per batch)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("steps")
    axes[0].legend(title="circle: critical batch; dotted: perfect scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

