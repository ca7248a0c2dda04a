"""Convergence table: per-epoch test accuracy, training objective and epoch time on real MNIST.

Runs each recipe through ``kfac.py`` (one after another, so they do not share the cores),
with the test set evaluated after every epoch, then prints a Markdown table per recipe and
a summary, and writes them to ``--out`` as ``convergence.md``. The run dirs and each recipe's
``<recipe>.log`` go to ``--runs``: ``--out`` when that is given, else the git-ignored
``benchmarks/runs/convergence``.

    python benchmarks/convergence.py --recipes adam_mlp momentum_cnn
    python benchmarks/convergence.py --recipes kfac_mlp kfac_cnn adam_mlp sgd_mlp --out /tmp/conv
    python benchmarks/convergence.py --recipes adam_mlp --tables-only   # tables again
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.workdir import METRICS_FILE, epoch_records, read_metrics  # noqa: E402

RECIPES = {
    "adam_mlp": "--model mlp --optimizer adam --optimizer-learning-rate 1e-4",
    "sgd_mlp": "--model mlp --optimizer sgd --optimizer-learning-rate 1e-1",
    "kfac_mlp": "--model mlp --optimizer sgd --optimizer-learning-rate 1e-1 --kfac "
                "--kfac-damping-act 0.01 --kfac-damping-err 1",
    "momentum_cnn": "--model cnn --optimizer momentum --optimizer-learning-rate 0.01",
    "kfac_cnn": "--model cnn --optimizer sgd --optimizer-learning-rate 1e-1 --kfac "
                "--kfac-damping-act 0.01 --kfac-damping-err 1",
    # The recommended amortized settings (configs/experiment/kfac_fast.yaml).
    "kfac_fast_mlp": "--model mlp experiment=kfac_fast",
    # The CNN: kfac_fast on momentum with weight decay (configs/experiment/kfac_fast_cnn.yaml).
    "kfac_fast_cnn": "experiment=kfac_fast_cnn",
}


def run(name: str, extra: list[str], out: Path) -> list[dict]:
    """Runs one recipe and returns its metrics records."""
    exp_dir = out / name
    cmd = [sys.executable, str(ROOT / "kfac.py"), *RECIPES[name].split(), *extra,
           "trainer.test_every_epoch=true", f"launcher.experiment_dir={exp_dir}", f"launcher.job_name={name}"]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"  {name}: {time.time() - start:.0f}s", flush=True)
    return read_records(exp_dir)


def read_records(exp_dir: Path) -> list[dict]:
    """The per-epoch metrics of the newest run under ``exp_dir`` (not trainer.test_every_steps' test records)."""
    newest = max(exp_dir.iterdir(), key=os.path.getmtime)
    return epoch_records(read_metrics(newest / METRICS_FILE))


def table(name: str, records: list[dict]) -> str:
    """A Markdown table of one run: epoch, train objective, train and test accuracy, epoch time."""
    lines = [f"### {name}: `{RECIPES[name]}`", "",
             "| epoch | train objective | train acc % | test acc % | epoch time s |",
             "|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['epoch']} | {r['train_objective']:.6g} | {r['train_accuracy']:.2f} | "
                     f"{r.get('test_accuracy', float('nan')):.2f} | {r['run_time']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", help="convergence.md; default: benchmarks/results/convergence")
    parser.add_argument("--runs", help="run dirs and logs; default: --out when given, else "
                                       "benchmarks/runs/convergence (git-ignored)")
    parser.add_argument("--tables-only", action="store_true",
                        help="run nothing: build the tables from the runs already under --runs")
    parser.add_argument("extra", nargs="*", help="more kfac.py flags or overrides for every recipe")
    args = parser.parse_args()
    out = Path(args.out or "benchmarks/results/convergence")
    runs = Path(args.runs or args.out or "benchmarks/runs/convergence")
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    sections, summary = [], ["| recipe | final train objective | final test acc % | best test acc % | "
                             "mean epoch time s |", "|---|---:|---:|---:|---:|"]
    for name in args.recipes:
        records = read_records(runs / name) if args.tables_only else run(name, args.extra, runs)
        sections.append(table(name, records))
        final = records[-1]
        summary.append(f"| {name} | {final['train_objective']:.6g} | {final['test_accuracy']:.2f} | "
                       f"{max(r['test_accuracy'] for r in records):.2f} | "
                       f"{sum(r['run_time'] for r in records) / len(records):.2f} |")
        text = "\n\n".join(["\n".join(summary), *sections]) + "\n"
        (out / "convergence.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
