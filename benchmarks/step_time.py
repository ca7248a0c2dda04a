"""Per-step time of SGD, Adam and K-FAC, K-FAC's split into phases, and bytes sent per step.

    python benchmarks/step_time.py --model mlp                                  # 1 rank
    mpiexec -n 4 python -m mpi4py benchmarks/step_time.py --model mlp           # 4 ranks

All optimizers run in the same processes on the same (real-shaped, random) batches, one after
another, so the ratios are measured under the same conditions. The global batch is
``--batch`` (100), split over the ranks; K-FAC runs LBANN's README recipe (factors and
inverses every step) unless ``--update-interval`` / ``--compute-interval`` say otherwise.
Rank 0 prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kfac_callback import KFACCallback  # noqa: E402
from launcher.env import rank_info  # noqa: E402
from models import build_model  # noqa: E402
from trainer.distributed import make_communicator  # noqa: E402
from trainer.optimizers import OptimizerConfig, build_optimizer  # noqa: E402


class CountingComm:
    """Wraps a communicator: counts the bytes each phase sends (payload per rank)."""

    def __init__(self, comm, phase_of) -> None:
        self.comm, self.phase_of = comm, phase_of
        self.rank, self.world_size, self.local_rank = comm.rank, comm.world_size, comm.local_rank
        self.bytes: dict[str, int] = defaultdict(int)

    def allreduce_sum_(self, tensors) -> None:
        self.bytes[self.phase_of()] += sum(t.numel() * t.element_size() for t in tensors)
        self.comm.allreduce_sum_(tensors)

    def broadcast_(self, tensors, src) -> None:
        self.bytes[self.phase_of()] += sum(t.numel() * t.element_size() for t in tensors)
        self.comm.broadcast_(tensors, src)

    def barrier(self) -> None:
        self.comm.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--batch", type=int, default=100, help="global mini-batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--update-interval", type=int, default=1)
    parser.add_argument("--compute-interval", type=int, default=1)
    args = parser.parse_args()

    info = rank_info(os.environ)
    torch.set_flush_denormal(True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_size))
    state = {"phase": "gradient_allreduce", "cb": None}

    def phase_of() -> str:
        cb = state["cb"]
        return cb.phase if state["phase"] == "kfac" and cb is not None and cb.phase else state["phase"]

    comm = CountingComm(make_communicator(info), phase_of)
    local = args.batch // comm.world_size
    gen = torch.Generator().manual_seed(1 + comm.rank)
    batches = [(torch.rand(local, 1, 28, 28, generator=gen), torch.randint(0, 10, (local,), generator=gen))
               for _ in range(4)]

    def run(optimizer_name: str, lr: float, kfac: bool) -> tuple[float, dict[str, float], dict[str, int], int]:
        torch.manual_seed(0)
        model = build_model(args.model)
        opt = build_optimizer(OptimizerConfig(name=optimizer_name, learning_rate=lr), model.parameters())
        cb = None
        if kfac:
            cb = KFACCallback(model, comm=comm, printer=lambda line: None, damping_act=0.01, damping_err=1.0,
                              update_interval_init=args.update_interval, update_interval_target=args.update_interval,
                              compute_interval_steps=args.compute_interval)
        state["cb"] = cb
        params = list(model.parameters())
        phases: dict[str, float] = defaultdict(float)
        comm.bytes.clear()
        times = []
        for step in range(args.warmup + args.steps):
            x, y = batches[step % len(batches)]
            if step == args.warmup:
                phases.clear()
                comm.bytes.clear()
                if cb:
                    cb.phase_times.clear()
            comm.barrier()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            state["phase"] = "gradient_allreduce"
            if comm.world_size > 1:
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                comm.allreduce_sum_([flat])
                flat /= comm.world_size
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            t2 = time.perf_counter()
            if cb:
                state["phase"] = "kfac"  # the callback names its phases itself (cb.phase)
                cb.step()
            opt.step()
            comm.barrier()
            t3 = time.perf_counter()
            if step >= args.warmup:
                phases["forward_backward"] += t1 - t0
                phases["gradient_allreduce"] += t2 - t1
                times.append(t3 - t0)
        if cb:
            for name, seconds in cb.phase_times.items():
                phases[name] += seconds
        n_params = sum(p.numel() for p in params)
        return statistics.median(times), {k: v / args.steps for k, v in phases.items()}, dict(comm.bytes), n_params

    results = {}
    for name, opt, lr, kfac in (("sgd", "sgd", 0.1, False), ("adam", "adam", 1e-4, False), ("kfac", "sgd", 0.1, True)):
        results[name] = run(opt, lr, kfac)
    if comm.rank != 0:
        return
    sgd = results["sgd"][0]
    print(f"### {args.model}, {comm.world_size} rank(s), global batch {args.batch}, update interval "
          f"{args.update_interval}, compute interval {args.compute_interval}, {torch.get_num_threads()} thread(s)/rank\n")
    print("| optimizer | median step ms | / SGD |\n|---|---:|---:|")
    for name, (median, _, _, _) in results.items():
        print(f"| {name} | {median * 1e3:.2f} | {median / sgd:.2f} |")
    _, phases, sent, n_params = results["kfac"]
    print("\n| K-FAC phase | ms per step |\n|---|---:|")
    own = dict(phases)
    own["factors"] = own.get("factors", 0.0) - own.get("factor_allreduce", 0.0)
    own["precondition"] = own.get("precondition", 0.0) - own.get("exchange", 0.0)
    for name in ("forward_backward", "gradient_allreduce", "factors", "factor_allreduce", "inverses",
                 "batch_gather", "precondition", "exchange"):
        print(f"| {name} | {own.get(name, 0.0) * 1e3:.2f} |")
    if comm.world_size > 1:
        print("\n| collective | bytes per step (payload per rank) |\n|---|---:|")
        for name, total in sorted(sent.items()):
            print(f"| {name} | {total / args.steps:,.0f} |")
        print(f"\nminimum: gradient {n_params * 4:,} B (one averaged copy); factors: the packed triangles above "
              "(a symmetric matrix needs only its triangle)")


if __name__ == "__main__":
    main()
