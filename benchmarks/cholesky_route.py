"""Whole K-FAC step time with the in-place LAPACK Cholesky against torch's public one.

    python benchmarks/cholesky_route.py --steps 200

One process, real MNIST batches of 100; K-FAC at LBANN's README recipe (inverses every step,
where the factorisation weighs most) and at kfac_fast, each once with the in-place
``?potrf`` route of ``kfac_callback.blocks.linalg`` and once with ``torch.linalg.cholesky_ex``,
taking turns of ``--round`` steps so drift touches all alike. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from step_time import RECIPE, Runner, fast_settings, mnist_batches  # noqa: E402

from kfac_callback import linalg  # noqa: E402
from kfac_callback.base import SingleProcess  # noqa: E402


def set_route(in_place: bool) -> None:
    """Selects the Cholesky route for the next steps (None = torch.linalg.cholesky_ex)."""
    linalg._POTRF.clear()
    if not in_place:
        linalg._POTRF.update({torch.float32: None, torch.float64: None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--round", type=int, default=10)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    comm = SingleProcess()
    batches = mnist_batches(100, 0, 1)
    fast_optimizer, fast_lr, fast_decay, fast_options = fast_settings()
    runners = {}
    for recipe in ("README recipe", "kfac_fast"):
        for in_place in (True, False):
            if recipe == "README recipe":
                runner = Runner("mlp", "sgd", 0.1, dict(RECIPE), comm, batches)
            else:
                runner = Runner("mlp", fast_optimizer, fast_lr, fast_options, comm, batches, fast_decay)
            runners[(recipe, in_place)] = runner
    for (_, in_place), runner in runners.items():
        set_route(in_place)
        runner.warm_up(10)
    done = 0
    while done < args.steps:
        for (_, in_place), runner in runners.items():
            set_route(in_place)
            for _ in range(args.round):
                runner.step(timed=True)
        done += args.round
    print(f"### MLP, 1 rank, batch 100, {torch.get_num_threads()} thread(s), mean of {done} steps "
          f"({os.cpu_count()} CPUs)\n")
    print("| recipe | in-place LAPACK ms | torch.linalg.cholesky_ex ms | public / in-place |\n|---|---:|---:|---:|")
    for recipe in ("README recipe", "kfac_fast"):
        fast, public = (runners[(recipe, p)].result(done)["mean"] * 1e3 for p in (True, False))
        print(f"| {recipe} | {fast:.2f} | {public:.2f} | {public / fast:.3f} |")


if __name__ == "__main__":
    main()
