"""Steps to accuracy against global batch size: K-FAC, Adam and momentum SGD, each tuned per batch.

For every global batch (``--batches``, default 100 300 1000 3000 10000) and every family, the
learning rate is tuned over a stated grid (``LR_GRID``): the three grid values around the
family's batch-scaled centre (``CENTRE``) are run, and while the best of them lies at an edge of
what was tried the next grid value beyond it is run too (at most ``MAX_WIDEN`` times), so a best
value is never an untried edge. Phase ``schedule`` then gives every family alike, at its best
constant rate and at 2x and 3x that rate, a linear warm-up (5% of the run) and a cosine decay over
the run (``optimizer.warmup_steps``, ``optimizer.schedule=cosine``). Phase ``levers`` measures the
K-FAC levers one at a time at ``--lever-batch``; phase ``objective`` measures the time to a
training objective (full training set) of each family's best recipe.

A run is one ``kfac.py`` process on one rank (MLP, real MNIST), tested every ``test_every(batch)``
steps, stopped at 98% test accuracy or after ``EPOCHS[batch]`` epochs. ``--jobs`` runs go at once,
each with ``cores / jobs`` threads. "Best" at a batch is the fastest in steps to 98% (then 97.5%;
then the best accuracy). The critical batch size of a family is the first measured batch past
which the next one (about 3x larger) saves less than a doubling would need to be worth it: the
steps fall by less than the factor ``(2/3)^log2(ratio)``, i.e. the local slope of log steps against
log batch is flatter than ``log(2/3)/log(2)``.

Resumable: ``<runs>/benchmark.json`` records every finished run; a second call runs only what is
missing. Summaries (``batch_scaling.md``, ``.csv``, ``.png``) go to ``--out``; run dirs and logs to
``--runs`` (git-ignored by default).

    python benchmarks/batch_scaling.py --phase lr --jobs 2
    python benchmarks/batch_scaling.py --phase schedule --jobs 2
    python benchmarks/batch_scaling.py --phase levers --lever-batch 3000
    python benchmarks/batch_scaling.py --phase objective --objective-batches 100 3000
    python benchmarks/batch_scaling.py --tables-only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.time_to_accuracy import Point, curve, first_hits, read_metrics  # noqa: E402

TARGETS = (97.5, 98.0)
OBJECTIVES = (1e-2, 1e-3)
BATCHES = (100, 300, 1000, 3000, 10000)
FAMILIES = ("kfac", "adam", "momentum")
LABELS = {"kfac": "K-FAC", "adam": "Adam", "momentum": "momentum SGD"}
# Learning-rate grids (half-decades) and each family's starting centre per batch.
LR_GRID = {
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "momentum": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "kfac": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
}
CENTRE = {
    "adam": {100: 1e-3, 300: 1e-3, 1000: 3e-3, 3000: 3e-3, 10000: 3e-3},
    "momentum": {100: 0.03, 300: 0.1, 1000: 0.3, 3000: 0.3, 10000: 1.0},
    "kfac": {100: 0.1, 300: 0.1, 1000: 0.3, 3000: 0.3, 10000: 0.3},
}
MAX_WIDEN = 2
EPOCHS = {100: 4, 300: 5, 1000: 8, 3000: 12, 10000: 15, 60000: 40}
# K-FAC as measured first (the probe): SGD base, damping act 0.03 / err 1, inverses every
# 5 steps; a running-average memory short enough for runs of a few hundred steps.
KFAC_BASE = ("--kfac --kfac-damping-act 0.03 --kfac-damping-err 1 --kfac-compute-interval-steps 5 "
             "kfac.kronecker_decay=0.95")
BASE_FLAGS = {"kfac": "--optimizer sgd " + KFAC_BASE, "adam": "--optimizer adam", "momentum": "--optimizer momentum"}
WARMUP_FRACTION = 0.05
# The objective phase evaluates the whole training set (6x a test): fewer tests, longer runs.
OBJECTIVE_EPOCHS = {100: 10, 300: 12, 1000: 15, 3000: 20, 10000: 20, 60000: 40}


def objective_every(batch: int) -> int:
    """Full-train evaluation interval of the objective phase: every half epoch at batch 100."""
    return max(1, round(30000 / batch))


def test_every(batch: int) -> int:
    """Test interval in steps: about 1/8 epoch at batch 100, every step at 10000 (a test costs ~1 step there)."""
    return max(1, round(5000 / batch))


def steps_per_epoch(batch: int, train: int = 60000) -> int:
    return math.ceil(train / batch)


@dataclass(frozen=True)
class Run:
    """One kfac.py run: its batch, family, a name unique in the benchmark, and its flags."""

    name: str
    batch: int
    family: str
    flags: str
    lr: float
    phase: str = "lr"

    def as_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "family": self.family, "flags": self.flags, "lr": self.lr, "phase": self.phase}


@dataclass
class Outcome:
    """What a run reached: its test curve, first hits of each target, and its status."""

    run: Run
    points: list[Point]
    hits: dict[float, Optional[Point]]
    status: str
    objective: dict[float, Optional[dict[str, float]]]

    @property
    def best(self) -> Optional[float]:
        return max((p.accuracy for p in self.points), default=None)

    def steps_to(self, target: float) -> Optional[int]:
        hit = self.hits.get(target)
        return hit.step if hit is not None else None


def lr_run(batch: int, family: str, lr: float, phase: str = "lr", extra: str = "", tag: str = "") -> Run:
    flags = f"{BASE_FLAGS[family]} --optimizer-learning-rate {lr:g}" + (f" {extra}" if extra else "")
    return Run(f"b{batch}_{family}_lr{lr:g}{tag}", batch, family, flags, lr, phase)


def schedule_extra(batch: int) -> str:
    warmup = max(1, round(WARMUP_FRACTION * EPOCHS[batch] * steps_per_epoch(batch)))
    return f"optimizer.warmup_steps={warmup} optimizer.schedule=cosine"


# -- choosing (pure) ----------------------------------------------------------------------------


def rank_key(o: Outcome) -> tuple:
    """Sort key, smaller is better: steps to 98%, then to 97.5%, then the best accuracy."""
    s98, s975 = o.steps_to(98.0), o.steps_to(97.5)
    return (s98 is None, s98 or 0, s975 is None, s975 or 0, -(o.best or 0.0))


def best_of(outcomes: Iterable[Outcome]) -> Optional[Outcome]:
    done = [o for o in outcomes if o.points]
    return min(done, key=rank_key) if done else None


def next_lr(grid: Sequence[float], tried: Sequence[float], best: float) -> Optional[float]:
    """The grid value beyond ``best`` when ``best`` is an edge of ``tried`` (None: no widening)."""
    tried = sorted(tried)
    i = grid.index(best)
    if best == tried[0] and i > 0 and grid[i - 1] not in tried:
        return grid[i - 1]
    if best == tried[-1] and i + 1 < len(grid) and grid[i + 1] not in tried:
        return grid[i + 1]
    return None


def first_grid(family: str, batch: int) -> list[float]:
    grid = LR_GRID[family]
    centre = CENTRE[family].get(batch) or min(grid, key=lambda v: abs(math.log(v / 1e-3)))
    i = grid.index(centre)
    return list(grid[max(0, i - 1): i + 2])


def steps_curve(outcomes: Sequence[Outcome], family: str, target: float,
                batches: Sequence[int]) -> dict[int, Optional[int]]:
    """Per batch, the family's fewest steps to ``target`` over all its runs (None: none reached it)."""
    out = {}
    for b in batches:
        steps = [o.steps_to(target) for o in outcomes if o.run.family == family and o.run.batch == b
                 and o.run.phase in ("lr", "schedule")]
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
             f"Each cell: steps / epochs / training seconds to the target for the family's best run at that batch "
             f"(tuned over the grid in `benchmarks/batch_scaling.py`: {settings.get('grid_note', '')}). "
             f"Tested every max(1, round(5000/batch)) steps; runs stop at 98% or after the epochs of `EPOCHS`. "
             f"{settings.get('jobs', 1)} runs at a time on {settings.get('cpu_count')} cores "
             f"({settings.get('threads', 1)} thread(s) each), so seconds compare within this table only.", ""]
    for target in TARGETS:
        lines += [f"## To {target:g}% test accuracy", "",
                  "| batch | " + " | ".join(LABELS[f] for f in FAMILIES) + " | K-FAC steps / best first-order |",
                  "|---:|" + "---|" * len(FAMILIES) + "---:|"]
        for b in batches:
            cells, steps = [], {}
            for fam in FAMILIES:
                mine = [o for o in outcomes if o.run.batch == b and o.run.family == fam and o.run.phase in ("lr", "schedule")]
                best = best_of(mine)
                label = "" if best is None else f" (`{best.run.name}`)"
                cells.append(_cell(best, target) + label)
                steps[fam] = steps_curve(outcomes, fam, target, [b])[b]
            first = [s for f, s in steps.items() if f != "kfac" and s is not None]
            ratio = f"{steps['kfac'] / min(first):.2f}" if steps["kfac"] and first else "-"
            lines.append(f"| {b} | " + " | ".join(cells) + f" | {ratio} |")
        lines += [""]
        for fam in FAMILIES:
            crit, how = critical_batch(steps_curve(outcomes, fam, target, batches))
            lines.append(f"- critical batch of {LABELS[fam]} at {target:g}%: {crit if crit else '-'} ({how})")
        lines.append("")
    lines += ["## Every run", "", "| run | phase | flags | steps to 97.5% | steps to 98% | best % | status |",
              "|---|---|---|---:|---:|---:|---|"]
    for o in sorted(outcomes, key=lambda o: (o.run.batch, o.run.family, o.run.phase, o.run.lr)):
        lines.append(f"| {o.run.name} | {o.run.phase} | `{o.run.flags}` | {o.steps_to(97.5) or '-'} | "
                     f"{o.steps_to(98.0) or '-'} | {o.best or 0:.2f} | {o.status} |")
    objective = [o for o in outcomes if o.run.phase == "objective"]
    if objective:
        lines += ["", "## Time to a training objective (full training set)", "",
                  "| run | " + " | ".join(f"to {v:g}: step / s" for v in OBJECTIVES) + " | lowest |",
                  "|---|" + "---:|" * (len(OBJECTIVES) + 1)]
        for o in objective:
            cells = []
            for v in OBJECTIVES:
                hit = o.objective.get(v)
                cells.append(f"{hit['step']} / {hit['train_time']:.0f}" if hit else "never")
            low = min((p["objective"] for p in o.objective.get("curve", [])), default=None)
            lowest = f"{low:.3g}" if low is not None else "-"
            lines.append(f"| {o.run.name} | " + " | ".join(cells) + f" | {lowest} |")
    return "\n".join(lines) + "\n"


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
            ax.plot(xs, [steps[b] for b in xs], marker="o", color=colors[fam], label=LABELS[fam])
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


# -- running (I/O) ------------------------------------------------------------------------------


def objective_hits(records: Sequence[Mapping[str, Any]]) -> dict:
    pts = [{"step": int(r["step"]), "train_time": float(r["train_time"]), "objective": float(r["train_objective_full"])}
           for r in records if r.get("kind") == "test" and "train_objective_full" in r]
    out: dict[Any, Any] = {v: next((p for p in pts if p["objective"] <= v), None) for v in OBJECTIVES}
    out["curve"] = pts
    return out


def outcome(run: Run, runs: Path, status: str) -> Outcome:
    records = read_metrics(runs / run.name)
    points = curve(records)
    return Outcome(run, points, first_hits(points, TARGETS), status, objective_hits(records))


def command(run: Run, runs: Path, threads: int, stop: Sequence[str]) -> list[str]:
    objective = run.phase == "objective"
    epochs = (OBJECTIVE_EPOCHS if objective else EPOCHS)[run.batch]
    every = (objective_every if objective else test_every)(run.batch)
    return [sys.executable, str(ROOT / "kfac.py"), "--model", "mlp", "--mini_batch_size", str(run.batch),
            *shlex.split(run.flags), "--nodes", "1", "--procs-per-node", "1",
            f"trainer.epochs={epochs}", f"trainer.test_every_steps={every}",
            *stop, "trainer.progress=false", f"trainer.num_threads={threads}", "trainer.test_every_epoch=false",
            f"launcher.experiment_dir={runs / run.name}", f"launcher.job_name={run.name}"]


class Bench:
    """The state file and the runs: each finished run is recorded at once, so a killed benchmark resumes."""

    def __init__(self, runs: Path, jobs: int, rerun: bool = False) -> None:
        self.runs, self.jobs = runs, jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.file = runs / "benchmark.json"
        self.state = json.loads(self.file.read_text()) if self.file.is_file() else {"runs": {}}
        self.rerun = rerun
        self.lock = threading.Lock()

    def done(self, run: Run) -> bool:
        return run.name in self.state["runs"] and not self.rerun

    def run_all(self, todo: Sequence[Run]) -> None:
        todo = [r for r in dict.fromkeys(todo) if not self.done(r)]
        if not todo:
            return
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(self._one, todo, range(1, len(todo) + 1), [len(todo)] * len(todo)))

    def _one(self, run: Run, i: int, n: int) -> None:
        stop = (["trainer.stop_at_test_accuracy=98.0"] if run.phase != "objective" else
                ["trainer.full_train_objective=true", f"trainer.stop_at_train_objective={min(OBJECTIVES):g}"])
        cmd = command(run, self.runs, self.threads, stop)
        print(f"[{i}/{n}] {run.name}: {shlex.join(cmd[2:])}", flush=True)
        start = time.time()
        with open(self.runs / f"{run.name}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        status = "ok" if rc == 0 else f"failed (exit {rc})"
        o = outcome(run, self.runs, status)
        print(f"[{i}/{n}] {run.name}: {status} in {time.time() - start:.0f}s; 97.5% at step {o.steps_to(97.5)}, "
              f"98% at step {o.steps_to(98.0)}, best {o.best}", flush=True)
        with self.lock:
            self.state["runs"][run.name] = {**run.as_json(), "status": status}
            self.file.write_text(json.dumps(self.state, indent=1) + "\n")

    def outcomes(self) -> list[Outcome]:
        return [outcome(Run(name, v["batch"], v["family"], v["flags"], v["lr"], v.get("phase", "lr")),
                        self.runs, v["status"]) for name, v in self.state["runs"].items()]


def phase_lr(bench: Bench, batches: Sequence[int], families: Sequence[str]) -> None:
    """Constant learning rates: the first grid, then widening while the best is at an edge."""
    bench.run_all([lr_run(b, f, lr) for b in batches for f in families for lr in first_grid(f, b)])
    for _ in range(MAX_WIDEN):
        more = []
        outcomes = bench.outcomes()  # every run's metrics, read once per round
        for b in batches:
            for f in families:
                mine = [o for o in outcomes if o.run.batch == b and o.run.family == f and o.run.phase == "lr"]
                best = best_of(mine)
                if best is not None:
                    lr = next_lr(LR_GRID[f], [o.run.lr for o in mine], best.run.lr)
                    if lr is not None:
                        more.append(lr_run(b, f, lr))
        if not more:
            return
        bench.run_all(more)


def phase_schedule(bench: Bench, batches: Sequence[int], families: Sequence[str]) -> None:
    """Warm-up + cosine for every family alike, at its best constant rate and 2x, 3x it."""
    todo = []
    outcomes = bench.outcomes()
    for b in batches:
        for f in families:
            best = best_of(o for o in outcomes if o.run.batch == b and o.run.family == f and o.run.phase == "lr")
            if best is None:
                continue
            for mult in (1, 2, 3):
                lr = float(f"{best.run.lr * mult:.3g}")
                todo.append(lr_run(b, f, lr, "schedule", schedule_extra(b), "_cos"))
    bench.run_all(todo)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--phase", choices=["lr", "schedule"], action="append", default=[])
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/batch_scaling")
    p.add_argument("--runs", type=Path, default=ROOT / "benchmarks/runs/batch_scaling")
    p.add_argument("--run", action="append", default=[], metavar='NAME:BATCH:FAMILY:PHASE="FLAGS"',
                   help="one more run with its own flags (levers, objective); repeatable")
    p.add_argument("--rerun", action="store_true", help="run again what is recorded as done")
    p.add_argument("--tables-only", action="store_true")
    args = p.parse_args(argv)
    if args.jobs < 1 or any(b not in EPOCHS for b in args.batches):
        p.error(f"--jobs must be >= 1 and every batch one of {sorted(EPOCHS)}")
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.runs, args.jobs, args.rerun)
    if not args.tables_only:
        if "lr" in args.phase:
            phase_lr(bench, args.batches, args.families)
        if "schedule" in args.phase:
            phase_schedule(bench, args.batches, args.families)
        extra = []
        for text in args.run:
            head, _, flags = text.partition("=")
            try:
                name, batch, family, phase = head.split(":")
                extra.append(Run(name, int(batch), family, flags, float("nan"), phase))
            except ValueError:
                p.error(f"--run: expected NAME:BATCH:FAMILY:PHASE=\"FLAGS\", got {text!r}")
        bench.run_all(extra)
    outcomes = bench.outcomes()
    settings = {"jobs": args.jobs, "threads": bench.threads, "cpu_count": os.cpu_count(),
                "grid_note": "; ".join(f"{LABELS[f]} lr in {{{', '.join(f'{v:g}' for v in LR_GRID[f])}}}" for f in FAMILIES)}
    batches = sorted({o.run.batch for o in outcomes}) or list(args.batches)
    (args.out / "batch_scaling.md").write_text(markdown(outcomes, batches, settings))
    write_csv(outcomes, args.out / "batch_scaling.csv")
    write_plot(outcomes, batches, args.out / "batch_scaling.png")
    print((args.out / "batch_scaling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
