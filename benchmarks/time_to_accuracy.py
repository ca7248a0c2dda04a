"""Time to accuracy: training wall-clock seconds until the test accuracy first reaches each target.

Runs each recipe through ``kfac.py`` (one after another, so they do not share the cores) with
the test set evaluated every ``--test-every-steps`` global steps (``trainer.test_every_steps``)
and the run stopped at the highest target (``trainer.stop_at_test_accuracy``) or after
``--max-epochs``. The candidates: Adam at four learning rates, plain SGD and SGD with momentum
0.9 at three each, and the K-FAC recipes (LBANN's README recipe, plus ``--kfac-recipe``). The
best Adam and the best SGD are the fastest to the highest target (then the next target down;
when none reaches any, the best final accuracy); K-FAC's times are given as ratios to theirs.

The clock is rank 0's training time: ``fit()`` less every test evaluation (the ``train_time``
of the ``"kind": "test"`` records in each run's ``metrics.jsonl``), so a time is known to within
one test interval. Written to ``--out`` (the summaries): ``time_to_accuracy.md`` (the table),
``time_to_accuracy.csv`` (every curve point), ``time_to_accuracy.png`` (accuracy against time).
Written to ``--runs`` (git-ignored by default, never committed): ``benchmark.json`` (the
settings, and each recipe's flags and exit status, for ``--tables-only``), and per recipe its
``<recipe>.log`` and experiment dir ``<recipe>/``. ``--runs`` defaults to ``--out`` when that is
given, else to ``benchmarks/runs/time_to_accuracy/<model>_<ranks>ranks``.

    python benchmarks/time_to_accuracy.py --model mlp --ranks 1
    python benchmarks/time_to_accuracy.py --model cnn --ranks 4 --out /tmp/tta_cnn_4
    python benchmarks/time_to_accuracy.py --only adam_lr1e-3,kfac_lbann,kfac_lr0.03 \\
        --kfac-recipe kfac_lr0.03="--optimizer sgd --optimizer-learning-rate 0.03 --kfac" data.max_train_samples=2000
    python benchmarks/time_to_accuracy.py --out /tmp/tta_cnn_4 --model cnn --ranks 4 --tables-only

The recipes, curves, hits and the report are ``benchmarks/time_to_accuracy_report.py``; here
the command line and the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.time_to_accuracy_report import (  # noqa: E402
    Recipe,
    Result,
    make_result,
    write_report,
)
from launcher import workdir  # noqa: E402
from launcher.workdir import METRICS_FILE  # noqa: E402

TARGETS = (97.5, 98.0)
TEST_EVERY_STEPS = {"mlp": 100, "cnn": 50, "vit": 50, "resnet": 50, "resnet_dw": 50}
LBANN_KFAC = "--optimizer sgd --optimizer-learning-rate 1e-1 --kfac --kfac-damping-act 0.01 --kfac-damping-err 1"


def default_recipes() -> list[Recipe]:
    """LBANN's K-FAC recipe, Adam at 1e-4 .. 3e-3, plain SGD and SGD with momentum 0.9."""
    recipes = [Recipe("kfac_lbann", "kfac", LBANN_KFAC)]
    recipes += [Recipe(f"adam_lr{lr}", "adam", f"--optimizer adam --optimizer-learning-rate {lr}")
                for lr in ("1e-4", "3e-4", "1e-3", "3e-3")]
    recipes += [Recipe(f"sgd_lr{lr}", "sgd", f"--optimizer sgd --optimizer-learning-rate {lr}")
                for lr in ("0.03", "0.1", "0.3")]
    recipes += [Recipe(f"sgd_momentum0.9_lr{lr}", "sgd", f"--optimizer momentum --optimizer-learning-rate {lr}")
                for lr in ("0.01", "0.03", "0.1")]
    return recipes


def parse_recipe(text: str, family: str = "kfac") -> Recipe:
    """``NAME=flags...`` as a recipe of ``family``; a K-FAC recipe (``--kfac-recipe``) gets
    ``--kfac`` if missing."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not sep or not name or not flags.strip() or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=\"flags ...\", got {text!r}")
    if family == "kfac" and "--kfac" not in shlex.split(flags):
        flags = f"{flags} --kfac"
    return Recipe(name, family, flags.strip())


def parse_kfac_recipe(text: str) -> Recipe:
    return parse_recipe(text, "kfac")


def parse_adam_recipe(text: str) -> Recipe:
    return parse_recipe(text, "adam")


# -- running (I/O) --------------------------------------------------------------------------


def read_metrics(exp_dir: Path) -> list[dict[str, Any]]:
    """The records of the newest run under ``exp_dir`` (unfinished lines skipped; [] if none)."""
    runs = [p for p in exp_dir.glob(f"*/{METRICS_FILE}")] if exp_dir.is_dir() else []
    return workdir.read_metrics(max(runs, key=os.path.getmtime)) if runs else []


def command(recipe: Recipe, model: str, ranks: int, out: Path, test_every: int, stop_at: float,
            max_epochs: int, extra: Sequence[str]) -> list[str]:
    """The kfac.py command of one recipe (``extra`` last, so it may override anything)."""
    return [sys.executable, str(ROOT / "kfac.py"), "--model", model, *shlex.split(recipe.flags),
            "--nodes", "1", "--procs-per-node", str(ranks), f"trainer.epochs={max_epochs}",
            f"trainer.test_every_steps={test_every}", f"trainer.stop_at_test_accuracy={stop_at}",
            "trainer.progress=false", f"launcher.experiment_dir={out / recipe.name}",
            f"launcher.job_name={recipe.name}", *extra]


def run_recipe(recipe: Recipe, cmd: list[str], out: Path) -> str:
    """Runs one recipe, its output into ``<out>/<name>.log``; returns ``ok`` or ``failed (exit N)``."""
    with open(out / f"{recipe.name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"


def _summary_line(result: Result, targets: Sequence[float]) -> str:
    parts = []
    for t in sorted(targets):
        hit = result.hits.get(t)
        parts.append(f"{t:g}% at {hit.train_time:.1f}s (step {hit.step})" if hit else f"{t:g}% not reached")
    best = f"best {result.best:.2f}%" if result.best is not None else "no test records"
    return f"{', '.join(parts)}; {best}"


def heading(settings: Mapping[str, Any], targets: Sequence[float]) -> tuple[str, list[str]]:
    """The report's title and notes, from the settings the runs were made with."""
    ranks = settings["ranks"]
    extra = settings.get("extra") or []
    title = f"Time to accuracy: {str(settings['model']).upper()}, {ranks} rank{'s' if ranks > 1 else ''}"
    notes = [f"Training wall-clock on rank 0 with test evaluations excluded; tested every "
             f"{settings['test_every_steps']} steps, so each time is known to within one test interval. Runs "
             f"stop at {settings['stop_at_test_accuracy']:g}% or after {settings['max_epochs']} epochs; "
             f"{settings.get('cpu_count')} CPU cores" + (f"; extra arguments: `{shlex.join(extra)}`" if extra else "")
             + ".",
             "Best Adam / best SGD: the fastest of their family to the highest target reached (then the next "
             "target down; none reached: the best final accuracy). A ratio `< x` means the baseline did not "
             "reach the target in its whole run (x uses its total time), `> x` that K-FAC did not."]
    return title, notes


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values or not all(0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"expected accuracies in % in (0, 100], got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     epilog="Other arguments (kfac.py flags or Hydra overrides) go to every run.")
    parser.add_argument("--model", choices=list(TEST_EVERY_STEPS), default="mlp")
    parser.add_argument("--ranks", type=int, default=1, help="MPI ranks per run (1 node; 100 %% ranks == 0)")
    parser.add_argument("--out", help="the table, CSV and plot; default: "
                                      "benchmarks/results/time_to_accuracy/<model>_<ranks>ranks")
    parser.add_argument("--runs", help="run dirs, logs and benchmark.json; default: --out when given, "
                                       "else benchmarks/runs/time_to_accuracy/<model>_<ranks>ranks (git-ignored)")
    parser.add_argument("--targets", type=_floats, default=list(TARGETS), help="test accuracies in %%, e.g. 97.5,98")
    parser.add_argument("--test-every-steps", type=int, help="default: 100 (mlp), 50 (cnn)")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--kfac-recipe", type=parse_kfac_recipe, action="append", default=[], metavar='NAME="FLAGS"',
                        help='one more K-FAC recipe, e.g. kfac_lr0.03="--optimizer sgd --optimizer-learning-rate 0.03 '
                             '--kfac"; repeatable')
    parser.add_argument("--adam-recipe", type=parse_adam_recipe, action="append", default=[], metavar='NAME="FLAGS"',
                        help='one more first-order recipe of the Adam family (AdamW, say); repeatable')
    parser.add_argument("--only", action="append", metavar="NAMES",
                        help="run (or tabulate) only these recipes: comma-separated, repeatable")
    parser.add_argument("--tables-only", action="store_true", help="run nothing: rebuild from the runs under --runs")
    parser.add_argument("--ylim", type=float, nargs=2, default=(95.0, 99.5))
    args, extra = parser.parse_known_args(argv)
    if args.ranks < 1 or args.max_epochs < 1 or (args.test_every_steps is not None and args.test_every_steps < 1):
        parser.error("--ranks, --max-epochs and --test-every-steps must be >= 1")
    out = Path(args.out or ROOT / "benchmarks/results/time_to_accuracy" / f"{args.model}_{args.ranks}ranks")
    runs = Path(args.runs or args.out or ROOT / "benchmarks/runs/time_to_accuracy" / f"{args.model}_{args.ranks}ranks")
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    test_every = args.test_every_steps or TEST_EVERY_STEPS[args.model]
    stop_at = max(args.targets)

    saved = runs / "benchmark.json"
    state = json.loads(saved.read_text()) if saved.is_file() else {"settings": {}, "recipes": {}}
    known = {r.name: r for r in default_recipes()}
    # Custom recipes of earlier runs, so --tables-only still knows their flags.
    known.update({n: Recipe(n, v["family"], v["flags"]) for n, v in state["recipes"].items() if n not in known})
    known.update({r.name: r for r in [*args.kfac_recipe, *args.adam_recipe]})
    names = [n for item in args.only for n in item.split(",") if n] if args.only else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--only: unknown recipe(s) {', '.join(unknown)}; known: {', '.join(known)}")
    recipes = [known[n] for n in names]
    if not args.tables_only:
        state["settings"] = {"model": args.model, "ranks": args.ranks, "test_every_steps": test_every,
                             "stop_at_test_accuracy": stop_at, "max_epochs": args.max_epochs, "extra": extra,
                             "cpu_count": os.cpu_count()}
    settings = state["settings"] or {"model": args.model, "ranks": args.ranks, "test_every_steps": test_every,
                                     "stop_at_test_accuracy": stop_at, "max_epochs": args.max_epochs,
                                     "extra": extra, "cpu_count": os.cpu_count()}

    results = []
    for i, recipe in enumerate(recipes, 1):
        status = state["recipes"].get(recipe.name, {}).get("status", "ok")
        if not args.tables_only:
            cmd = command(recipe, args.model, args.ranks, runs, test_every, stop_at, args.max_epochs, extra)
            print(f"[{i}/{len(recipes)}] {recipe.name}: {shlex.join(cmd[1:])}", flush=True)
            start = time.time()
            status = run_recipe(recipe, cmd, runs)
            print(f"[{i}/{len(recipes)}] {recipe.name}: {status} after {time.time() - start:.0f}s wall", flush=True)
            state["recipes"][recipe.name] = {"family": recipe.family, "flags": recipe.flags, "status": status}
            saved.write_text(json.dumps(state, indent=1) + "\n")
        records = read_metrics(runs / recipe.name)
        if not records and args.tables_only:
            print(f"{recipe.name}: no run under {runs / recipe.name}; skipped", flush=True)
            continue
        result = make_result(recipe, records, args.targets, status)
        results.append(result)
        print(f"[{i}/{len(recipes)}] {recipe.name}: {_summary_line(result, args.targets)}", flush=True)

    title, notes = heading(settings, args.targets)
    paths = write_report(results, args.targets, out, title, notes, tuple(args.ylim))
    print((out / "time_to_accuracy.md").read_text())
    print("wrote " + ", ".join(map(str, paths)))
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
