"""Time to a training objective on the MNIST deep autoencoder: K-FAC against tuned first-order methods.

Every run is one ``kfac.py`` process on one rank (``--model autoencoder``, all 60000 training
images unless ``--train-samples``), given the same budget of training seconds
(``trainer.max_train_seconds``; evaluations are outside the clock), with the objective and the
reconstruction error evaluated on the whole training set at every periodic test. Families:

- ``adam`` and ``nesterov`` (SGD with Nesterov momentum 0.9): a learning-rate grid of half-decades
  (``GRIDS``), 4 rates spanning 30x around a centre, widened while the best is at an edge; then
  the best rate again with a linear warm-up (5% of the steps) and a cosine decay over the steps the
  constant run took in the budget (``schedule`` phase);
- ``kfac``: K-FAC with its own small grid (``KFAC_GRID``: rate and damping);
- ``kfac_adaptive``: ``experiment=kfac_adaptive`` untouched;
- ``kfac_jax``: kfac-jax's own K-FAC with its MNIST-autoencoder settings on the same images and
  batch (``benchmarks/peers/kfac_jax_autoencoder.py``, in a scratch venv given by ``--peer-python``).

"Best" is the lowest final full-train objective. The report (``autoencoder_report.py``) gives,
per batch, the time each method takes to reach the best first-order method's final objective,
and plots objective and error against seconds and steps. Finished runs are kept in
``<out>/runs.json`` (committed); a second call runs only what is missing. Run dirs go to ``--runs``.

    python benchmarks/autoencoder.py --batch 1000 --seconds 120 --phase grid
    python benchmarks/autoencoder.py --batch 1000 --seconds 120 --phase schedule
    python benchmarks/autoencoder.py --batch 1000 --seconds 120 --phase peer --peer-python /path/to/venv/bin/python
    python benchmarks/autoencoder.py --run NAME='overrides ...' --batch 1000 --seconds 60
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.autoencoder_report import FIRST_ORDER, best_run, write_report  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "autoencoder"
GRIDS = {"adam": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "nesterov": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}
CENTRE = {"adam": 1e-3, "nesterov": 1e-4}
FAMILY_FLAGS = {"adam": ["optimizer=adam"], "nesterov": ["optimizer=momentum", "optimizer.nesterov=true"]}
MAX_WIDEN = 2
# K-FAC by hand: SGD at a rate under fixed factor damping (π-corrected), inverses every 5 steps.
KFAC_BASE = ["optimizer=sgd", "kfac.enabled=true", "kfac.use_pi=true", "kfac.compute_interval_steps=5",
             "kfac.kronecker_decay=0.95", "kfac.factor_batch_size=1000"]
KFAC_GRID = {f"kfac_lr{lr:g}_d{d:g}": [*KFAC_BASE, f"optimizer.learning_rate={lr}", f"kfac.damping_act=[{d}]",
                                       f"kfac.damping_err=[{d}]"] for lr in (0.3, 1.0) for d in (0.1, 1.0)}
ADAPTIVE = {"kfac_adaptive": ["experiment=kfac_adaptive"]}


def test_every(batch: int) -> int:
    """Steps between full-train evaluations (each about a forward pass over the 60000 images):
    every 60000 samples, at least every step."""
    return max(1, 60000 // batch)


def rate_runs(family: str, rates: list[float]) -> dict[str, list[str]]:
    return {f"{family}_lr{lr:g}": [*FAMILY_FLAGS[family], f"optimizer.learning_rate={lr}"] for lr in rates}


def run_one(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One ``kfac.py`` run; its full-train curve: (train seconds, step, objective, mse) per test."""
    exp = Path(args.runs) / f"b{args.batch}" / name
    cmd = [*pin(args), sys.executable, str(ROOT / "kfac.py"), "--model", "autoencoder", *overrides,
           f"trainer.mini_batch_size={args.batch}", "trainer.epochs=100000", "trainer.progress=false",
           f"trainer.test_every_steps={args.test_every or test_every(args.batch)}", "trainer.full_train_objective=true",
           f"trainer.max_train_seconds={args.seconds}", "data.max_test_samples=1000", "trainer.keep_checkpoints=1",
           f"trainer.num_threads={args.threads}",
           f"launcher.experiment_dir={exp}", f"launcher.job_name={name}"]
    if args.train_samples:
        cmd.append(f"data.max_train_samples={args.train_samples}")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(overrides)}", flush=True)
    log = exp.parent / f"{name}.log"
    exp.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode
    metrics = sorted(exp.glob("*/metrics.jsonl"))
    records = [json.loads(line) for line in metrics[-1].read_text().splitlines()] if metrics else []
    curve = [(r["train_time"], r["step"], r["train_objective_full"], r["train_mse_full"])
             for r in records if r.get("kind") == "test" and "train_objective_full" in r]
    return {"name": name, "overrides": overrides, "exit": code, "curve": curve, "log": str(log)}


def run_peer(args: argparse.Namespace) -> dict[str, Any]:
    """kfac-jax's K-FAC on the same images and batch, in its own venv."""
    images = Path(args.runs) / "mnist_train_images.npy"
    if not images.exists():
        import numpy as np

        from trainer.data.mnist import default_data_dir, load_mnist

        data = load_mnist(default_data_dir(), None, None, fetch=False)
        images.parent.mkdir(parents=True, exist_ok=True)
        np.save(images, data.train_x.reshape(len(data.train_x), -1).float().numpy())
    out = Path(args.runs) / f"b{args.batch}" / "kfac_jax.jsonl"
    cmd = [*pin(args), args.peer_python, str(ROOT / "benchmarks/peers/kfac_jax_autoencoder.py"),
           "--threads", str(args.threads), "--images", str(images),
           "--batch-size", str(args.batch), "--seconds", str(args.seconds), "--out", str(out), "--init", "lecun_normal"]
    if args.train_samples:
        cmd += ["--limit", str(args.train_samples)]
    print(f"[{time.strftime('%H:%M:%S')}] kfac_jax: {shlex.join(cmd)}", flush=True)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    curve = [(r["wall_s"], r["step"], r["objective"], r["mse"]) for r in rows if r.get("event") == "eval"]
    return {"name": "kfac_jax", "overrides": ["kfac-jax 0.0.8, examples/autoencoder_mnist settings"], "exit": code,
            "curve": curve}


def pin(args: argparse.Namespace) -> list[str]:
    """``taskset -c CPUS`` when ``--cpus`` is given: runs stay on their cores, others off them."""
    return ["taskset", "-c", args.cpus] if args.cpus else []


class Store:
    """``runs.json``: {batch: {run name: run}}; saved after every run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def runs(self, batch: int) -> dict[str, Any]:
        return self.data.setdefault(str(batch), {})

    def add(self, batch: int, run: dict[str, Any]) -> None:
        """Adds ``run`` to the file as it is now (another process may have added runs meanwhile)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text()) if self.path.exists() else {}
            for b, runs in on_disk.items():
                self.data.setdefault(b, {}).update({n: r for n, r in runs.items() if n not in self.data.get(b, {})})
            self.runs(batch)[run["name"]] = run
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)


def ensure(store: Store, args: argparse.Namespace, planned: dict[str, list[str]]) -> None:
    for name, overrides in planned.items():
        if name not in store.runs(args.batch):
            store.add(args.batch, run_one(name, overrides, args))


def tune(store: Store, args: argparse.Namespace, family: str) -> None:
    """4 rates around the centre, then one more beyond an edge while the best is at it."""
    grid = list(GRIDS[family])
    i = grid.index(CENTRE[family])
    lo, hi = max(0, i - 2), min(len(grid), i + 2)
    ensure(store, args, rate_runs(family, grid[lo:hi]))
    for _ in range(MAX_WIDEN):
        runs = {n: r for n, r in store.runs(args.batch).items() if n.startswith(f"{family}_lr")}
        best = best_run(runs)
        rate = float(best.split("_lr")[1])
        tried = sorted(float(n.split("_lr")[1]) for n in runs)
        if rate == tried[0] and grid.index(rate) > 0:
            ensure(store, args, rate_runs(family, [grid[grid.index(rate) - 1]]))
        elif rate == tried[-1] and grid.index(rate) < len(grid) - 1:
            ensure(store, args, rate_runs(family, [grid[grid.index(rate) + 1]]))
        else:
            return


def schedule(store: Store, args: argparse.Namespace, family: str) -> None:
    """The family's best constant rate with warm-up (5%) and cosine decay over its steps."""
    runs = store.runs(args.batch)
    best = best_run({n: r for n, r in runs.items() if n.startswith(f"{family}_lr")})
    steps = runs[best]["curve"][-1][1]
    overrides = [*runs[best]["overrides"], f"optimizer.warmup_steps={max(1, steps // 20)}",
                 "optimizer.schedule=cosine", f"optimizer.schedule_steps={steps}"]
    ensure(store, args, {f"{best}_cosine": overrides})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=120.0, help="training seconds per run")
    parser.add_argument("--phase", choices=["grid", "schedule", "kfac", "peer", "none"], default="none")
    parser.add_argument("--families", nargs="*", default=[*FIRST_ORDER])
    parser.add_argument("--run", action="append", default=[], help="NAME='overrides' (an extra run)")
    parser.add_argument("--train-samples", type=int, default=0, help="0: all 60000")
    parser.add_argument("--peer-python", default="")
    parser.add_argument("--cpus", default="", help="taskset CPU list for every run (e.g. 0)")
    parser.add_argument("--test-every", type=int, default=0, help="steps between full-train evaluations "
                        "(0: one per 60000 samples)")
    parser.add_argument("--threads", type=int, default=1, help="torch (and XLA) threads per run")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--runs", default=str(ROOT / "experiments" / "autoencoder"))
    args = parser.parse_args()
    store = Store(Path(args.out) / "runs.json")
    if args.phase == "grid":
        for family in args.families:
            tune(store, args, family)
    elif args.phase == "schedule":
        for family in args.families:
            schedule(store, args, family)
    elif args.phase == "kfac":
        ensure(store, args, {**ADAPTIVE, **KFAC_GRID})
    elif args.phase == "peer":
        store.add(args.batch, run_peer(args))
    for item in args.run:
        name, _, flags = item.partition("=")
        ensure(store, args, {name: shlex.split(flags)})
    write_report(store.data, Path(args.out))


if __name__ == "__main__":
    main()
