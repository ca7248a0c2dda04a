"""One rank of a real MPI job for test_skip_weight_grad.py (not collected by pytest).

    mpiexec -n 4 python -m mpi4py tests/kfac_callback/skip_ranks_job.py OUT_DIR

For every scenario, trains test_skip_weight_grad's net with skip_weight_grad on all ranks
(each rank on its share of every global batch, gradients averaged as the trainer does) and,
in the same process, the plain K-FAC step on one rank over the whole batches. Each rank
writes ``OUT_DIR/rank<R>.json``: per scenario, the largest relative weight difference, the
distance moved from the initial weights, whether the K-FAC lines were the same, and which
weight gradients backward left on the last step.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kfac_callback import KFACCallback  # noqa: E402
from kfac_callback.base import SingleProcess  # noqa: E402
from launcher.env import rank_info  # noqa: E402
from tests.kfac_callback.test_skip_weight_grad import D, Net, data  # noqa: E402
from trainer.ranks.distributed import make_communicator  # noqa: E402

SCENARIOS = {
    "cholesky": {},
    "explicit_inverses": {"compute_interval_steps": 3},
    "lr_factor": {"learning_rate_factor": 0.5},
    "update_interval": {"update_interval_init": 1, "update_interval_target": 2, "update_interval_steps": 2},
    "shared_layer": {"share": True},
    "accumulate": {"zero": False},
    "nan_on_rank0": {"poison_step": 3},
}


def average_gradients(model: torch.nn.Module, comm) -> None:
    """The trainer's averaging: the gradients backward left, summed in one collective."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if comm.world_size > 1 and grads:
        comm.allreduce_sum_(grads)
        for g in grads:
            g /= comm.world_size


def train(comm, skip: bool, share: bool = False, zero: bool = True, poison_step: int | None = None,
          **options) -> tuple[Net, list[str], dict[str, bool]]:
    model = Net(share).to(D)
    lines: list[str] = []
    cb = KFACCallback(model, comm=comm, printer=lines.append, damping_act=0.01, damping_err=0.1,
                      skip_weight_grad=skip, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = {}
    for step in range(6):
        x, y = data(step)
        if poison_step == step:
            x[0, 0] = float("nan")  # a row of rank 0's share
        share_rows = len(y) // comm.world_size
        rows = slice(comm.rank * share_rows, (comm.rank + 1) * share_rows)
        loss = F.cross_entropy(model(x[rows]), y[rows])
        if zero:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        seen = {n: p.grad is not None for n, p in model.named_parameters()}
        average_gradients(model, comm)
        cb.step()
        opt.step()
    return model, lines, seen


def relative_difference(a: Net, b: Net) -> float:
    return max(float((p - q).norm() / q.norm()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def main() -> None:
    out_dir = sys.argv[1]
    comm = make_communicator(rank_info(os.environ))
    results = {}
    for name, options in SCENARIOS.items():
        skipped, lines, seen = train(comm, True, **options)
        plain, plain_lines, _ = train(SingleProcess(), False, **options)
        initial = Net(options.get("share", False)).to(D)
        results[name] = {"difference": relative_difference(skipped, plain),
                         "moved": relative_difference(plain, initial),
                         "same_lines": lines == plain_lines, "lines": lines, "seen": seen}
    with open(os.path.join(out_dir, f"rank{comm.rank}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
