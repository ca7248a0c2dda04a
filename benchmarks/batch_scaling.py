"""Steps to accuracy against global batch size: K-FAC, Adam and momentum SGD, each tuned per batch.

For every global batch (``--batches``, default 100 300 1000 3000 10000) and every family, the
learning rate is tuned over a stated grid (``LR_GRID``): the three grid values around the
family's batch-scaled centre (``CENTRE``) are run, and while the best of them lies at an edge of
what was tried the next grid value beyond it is run too (at most ``MAX_WIDEN`` times), so a best
value is never an untried edge. Phase ``schedule`` then gives every family alike, at its best
constant rate and at 2x and 3x that rate, a linear warm-up (5% of the run) and a cosine decay over
the run (``optimizer.warmup_steps``, ``optimizer.schedule=cosine``). Phase ``levers`` changes one
thing at a time (``LEVERS``) of the best constant-rate K-FAC run at ``--lever-batch``. Phase
``large_batch`` runs ``experiment=kfac_large_batch`` over its own rate grid. Phase ``objective``
reruns each family's best run at ``--objective-batches`` with the training objective evaluated
on the whole training set, until it reaches ``min(OBJECTIVES)``.

A run is one ``kfac.py`` process on one rank (MLP, real MNIST), tested every ``test_every(batch)``
steps, stopped at 98% test accuracy or after ``EPOCHS[batch]`` epochs. ``--jobs`` runs go at once,
each with ``cores / jobs`` threads. "Best" and the critical batch size are defined in
``benchmarks/batch_scaling_report.py``.

Resumable across machines: ``<out>/runs.json`` (committed) keeps every finished run's summary,
its test and objective curves; a second call runs only what is missing and the report is rebuilt
from that file alone. Run dirs and logs go to ``--runs`` (git-ignored by default).

    python benchmarks/batch_scaling.py --phase lr --jobs 2
    python benchmarks/batch_scaling.py --phase schedule --jobs 2
    python benchmarks/batch_scaling.py --phase levers --lever-batch 3000 --jobs 2
    python benchmarks/batch_scaling.py --phase large_batch --batches 1000 3000 10000 --jobs 2
    python benchmarks/batch_scaling.py --phase objective --objective-batches 100 3000 --jobs 2
    python benchmarks/batch_scaling.py --tables-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.batch_scaling_report import (  # noqa: E402
    CURVE_PHASES,
    FAMILIES,
    LABELS,
    OBJECTIVES,
    Outcome,
    Run,
    best_of,
    markdown,
    write_csv,
    write_plot,
)
from benchmarks.time_to_accuracy import read_metrics  # noqa: E402
from benchmarks.time_to_accuracy_report import curve  # noqa: E402

BATCHES = (100, 300, 1000, 3000, 10000)
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
# experiment=kfac_large_batch's own rate grid (phase large_batch starts from its middle three).
LARGE_BATCH_LR_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)


def objective_every(batch: int) -> int:
    """Full-train evaluation interval of the objective phase: every half epoch at batch 100."""
    return max(1, round(30000 / batch))


def test_every(batch: int) -> int:
    """Test interval in steps: about 1/8 epoch at batch 100, every step at 10000 (a test costs ~1 step there)."""
    return max(1, round(5000 / batch))


def steps_per_epoch(batch: int, train: int = 60000) -> int:
    return math.ceil(train / batch)


def lr_run(batch: int, family: str, lr: float, phase: str = "lr", extra: str = "", tag: str = "") -> Run:
    return _rate_run(batch, family, family, BASE_FLAGS[family], lr, phase, extra, tag)


def large_batch_run(batch: int, lr: float, phase: str = "large_batch", extra: str = "", tag: str = "") -> Run:
    return _rate_run(batch, "kfac", "kfaclb", "experiment=kfac_large_batch", lr, phase, extra, tag)


def _rate_run(batch: int, family: str, label: str, base: str, lr: float, phase: str, extra: str, tag: str) -> Run:
    """A run of ``base`` flags at rate ``lr``, named ``b<batch>_<label>_lr<lr><tag>``."""
    flags = f"{base} --optimizer-learning-rate {lr:g}" + (f" {extra}" if extra else "")
    return Run(f"b{batch}_{label}_lr{lr:g}{tag}", batch, family, flags, lr, phase)


def schedule_extra(batch: int) -> str:
    warmup = max(1, round(WARMUP_FRACTION * EPOCHS[batch] * steps_per_epoch(batch)))
    return f"optimizer.warmup_steps={warmup} optimizer.schedule=cosine"


# The K-FAC levers, one at a time, each on top of the best constant-rate K-FAC run at the batch:
# (name tag, what it changes, flags appended (later flags win), learning-rate multiplier).
LEVERS = (
    ("fb1000", "factors from 1000 samples of the batch", "kfac.factor_batch_size=1000", 1.0),
    ("mc", "Monte-Carlo Fisher", "kfac.fisher=mc", 1.0),
    ("kl", "KL-clip 1e-3", "kfac.kl_clip=0.001", 1.0),
    ("kl", "KL-clip 1e-3 at 3x the rate", "kfac.kl_clip=0.001", 3.0),
    ("mom", "momentum 0.9 on top, rate / 10", "--optimizer momentum", 0.1),
    ("dact0.1", "act damping 0.1 (3x)", "--kfac-damping-act 0.1", 1.0),
    ("dact0.01", "act damping 0.01 (/3)", "--kfac-damping-act 0.01", 1.0),
    ("inv1", "inverses every step (not every 5)", "--kfac-compute-interval-steps 1", 1.0),
    ("wd", "weight decay 1e-4", "optimizer.weight_decay=0.0001", 1.0),
)


def lever_runs(base: Run) -> list[Run]:
    """The levers applied to ``base`` (a K-FAC run), one run each."""
    runs = []
    for tag, note, flags, mult in LEVERS:
        lr = float(f"{base.lr * mult:.3g}")
        flags = f"{base.flags.replace(f'--optimizer-learning-rate {base.lr:g}', f'--optimizer-learning-rate {lr:g}')} {flags}"
        runs.append(Run(f"b{base.batch}_kfac_lr{lr:g}_{tag}", base.batch, "kfac", flags, lr, "lever", note))
    return runs


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


# -- running (I/O) ------------------------------------------------------------------------------


def objective_curve(records: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """The full-train objective of each test record that has one, in order."""
    return [{"step": int(r["step"]), "train_time": float(r["train_time"]), "objective": float(r["train_objective_full"])}
            for r in records if r.get("kind") == "test" and "train_objective_full" in r]


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
    """The state file and the runs: each finished run's summary is recorded at once, so a killed
    benchmark resumes, and the report needs nothing but the state file."""

    def __init__(self, state_file: Path, runs: Path, jobs: int, rerun: bool = False) -> None:
        self.file, self.runs, self.jobs = state_file, runs, jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
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

    def record(self, run: Run, status: str) -> Outcome:
        """Reads the run's metrics from its run dir and stores its summary in the state file."""
        records = read_metrics(self.runs / run.name)
        o = Outcome.of(run, curve(records), status, objective_curve(records))
        with self.lock:
            self.state["runs"][run.name] = o.as_json()
            self.file.write_text(json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        return o

    def _one(self, run: Run, i: int, n: int) -> None:
        stop = (["trainer.stop_at_test_accuracy=98.0"] if run.phase != "objective" else
                ["trainer.full_train_objective=true", f"trainer.stop_at_train_objective={min(OBJECTIVES):g}"])
        cmd = command(run, self.runs, self.threads, stop)
        print(f"[{i}/{n}] {run.name}: {shlex.join(cmd[2:])}", flush=True)
        start = time.time()
        with open(self.runs / f"{run.name}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        o = self.record(run, "ok" if rc == 0 else f"failed (exit {rc})")
        print(f"[{i}/{n}] {run.name}: {o.status} in {time.time() - start:.0f}s; 97.5% at step {o.steps_to(97.5)}, "
              f"98% at step {o.steps_to(98.0)}, best {o.best}", flush=True)

    def outcomes(self) -> list[Outcome]:
        return [Outcome.from_json(name, v) for name, v in self.state["runs"].items()]


def best_run(outcomes: Sequence[Outcome], batch: int, family: str, phases: Sequence[str]) -> Optional[Run]:
    best = best_of(o for o in outcomes if o.run.batch == batch and o.run.family == family and o.run.phase in phases)
    return best.run if best is not None else None


def widen(bench: Bench, groups: Sequence[tuple[Sequence[float], Callable[[Outcome], bool], Callable[[float], Run]]]) -> None:
    """Up to ``MAX_WIDEN`` rounds: in each group (its rate grid, which outcomes are its runs, the
    run of a rate) whose best rate is an edge of what it tried, run the grid value beyond it."""
    for _ in range(MAX_WIDEN):
        outcomes = bench.outcomes()  # every run's summary, read once per round
        more = []
        for grid, member, make in groups:
            mine = [o for o in outcomes if member(o)]
            best = best_of(mine)
            lr = next_lr(grid, [o.run.lr for o in mine], best.run.lr) if best is not None else None
            if lr is not None:
                more.append(make(lr))
        if not more:
            return
        bench.run_all(more)


def phase_lr(bench: Bench, batches: Sequence[int], families: Sequence[str]) -> None:
    """Constant learning rates: the first grid, then widening while the best is at an edge."""
    bench.run_all([lr_run(b, f, lr) for b in batches for f in families for lr in first_grid(f, b)])
    widen(bench, [(LR_GRID[f], lambda o, b=b, f=f: o.run.batch == b and o.run.family == f and o.run.phase == "lr",
                   lambda lr, b=b, f=f: lr_run(b, f, lr)) for b in batches for f in families])


def phase_schedule(bench: Bench, batches: Sequence[int], families: Sequence[str]) -> None:
    """Warm-up + cosine for every family alike, at its best constant rate and 2x, 3x it; for K-FAC
    also on ``kfac_large_batch`` at its best rate, where phase large_batch ran at that batch."""
    def rates(best: Optional[Run]) -> list[float]:
        return [] if best is None else [float(f"{best.lr * mult:.3g}") for mult in (1, 2, 3)]

    todo = []
    outcomes = bench.outcomes()
    for b in batches:
        extra = schedule_extra(b)
        for f in families:
            todo += [lr_run(b, f, lr, "schedule", extra, "_cos") for lr in rates(best_run(outcomes, b, f, ("lr",)))]
        if "kfac" in families:
            todo += [large_batch_run(b, lr, "schedule", extra, "_cos")
                     for lr in rates(best_run(outcomes, b, "kfac", ("large_batch",)))]
    bench.run_all(todo)


def phase_levers(bench: Bench, batch: int) -> None:
    base = best_run(bench.outcomes(), batch, "kfac", ("lr",))
    if base is None:
        sys.exit(f"batch_scaling: no constant-rate K-FAC run at batch {batch}; run --phase lr --batches {batch} first")
    bench.run_all(lever_runs(base))


def phase_large_batch(bench: Bench, batches: Sequence[int]) -> None:
    """``experiment=kfac_large_batch`` at each batch over its rate grid, widened like phase lr."""
    grid = LARGE_BATCH_LR_GRID
    bench.run_all([large_batch_run(b, lr) for b in batches for lr in grid[1:4]])
    widen(bench, [(grid, lambda o, b=b: o.run.batch == b and o.run.phase == "large_batch",
                   lambda lr, b=b: large_batch_run(b, lr)) for b in batches])


def phase_objective(bench: Bench, batches: Sequence[int], families: Sequence[str]) -> None:
    """Each family's best run at each batch again, with the full-train objective, to min(OBJECTIVES)."""
    todo = []
    outcomes = bench.outcomes()
    for b in batches:
        for f in families:
            best = best_run(outcomes, b, f, CURVE_PHASES)
            if best is None:
                print(f"batch_scaling: no {LABELS[f]} run at batch {b} to take to the objective; skipped", flush=True)
                continue
            todo.append(Run(f"{best.name}_obj", b, f, best.flags, best.lr, "objective", f"best of {best.name}"))
    bench.run_all(todo)


def parse_run(text: str) -> Run:
    """``NAME:BATCH:FAMILY:PHASE=FLAGS`` (``--run``); the rate from ``--optimizer-learning-rate``
    where the flags give one (phases widen over it), else NaN. ValueError when malformed."""
    head, _, flags = text.partition("=")
    name, batch, family, phase = head.split(":")
    words = shlex.split(flags)
    flag = "--optimizer-learning-rate"
    lr = float(words[words.index(flag) + 1]) if flag in words else math.nan
    return Run(name, int(batch), family, flags, lr, phase)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--phase", choices=["lr", "schedule", "levers", "large_batch", "objective"], action="append",
                   default=[])
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--lever-batch", type=int, default=3000)
    p.add_argument("--objective-batches", type=int, nargs="+", default=[100, 3000])
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/batch_scaling")
    p.add_argument("--runs", type=Path, default=ROOT / "benchmarks/runs/batch_scaling")
    p.add_argument("--run", action="append", default=[], metavar='NAME:BATCH:FAMILY:PHASE="FLAGS"',
                   help="one more run with its own flags; repeatable")
    p.add_argument("--rerun", action="store_true", help="run again what is recorded as done")
    p.add_argument("--tables-only", action="store_true")
    args = p.parse_args(argv)
    batches = [*args.batches, args.lever_batch, *args.objective_batches]
    if args.jobs < 1 or any(b not in EPOCHS for b in batches):
        p.error(f"--jobs must be >= 1 and every batch one of {sorted(EPOCHS)}")
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.out / "runs.json", args.runs, args.jobs, args.rerun)
    if not args.tables_only:
        phases = {"lr": lambda: phase_lr(bench, args.batches, args.families),
                  "schedule": lambda: phase_schedule(bench, args.batches, args.families),
                  "levers": lambda: phase_levers(bench, args.lever_batch),
                  "large_batch": lambda: phase_large_batch(bench, args.batches),
                  "objective": lambda: phase_objective(bench, args.objective_batches, args.families)}
        for phase in args.phase:
            phases[phase]()
        try:
            extra = [parse_run(text) for text in args.run]
        except ValueError:
            p.error('--run: expected NAME:BATCH:FAMILY:PHASE="FLAGS"')
        bench.run_all(extra)
    outcomes = bench.outcomes()
    settings = {"jobs": args.jobs, "threads": bench.threads, "cpu_count": os.cpu_count(),
                "grid_note": "; ".join(f"{LABELS[f]} lr in {{{', '.join(f'{v:g}' for v in LR_GRID[f])}}}" for f in FAMILIES)}
    shown = sorted({o.run.batch for o in outcomes}) or list(args.batches)
    (args.out / "batch_scaling.md").write_text(markdown(outcomes, shown, settings))
    write_csv(outcomes, args.out / "batch_scaling.csv")
    write_plot(outcomes, shown, args.out / "batch_scaling.png")
    print((args.out / "batch_scaling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
