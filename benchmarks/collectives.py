"""mpi4py against gloo: allreduce and broadcast of CPU tensors, in one MPI job.

    mpiexec -n 4 python -m mpi4py benchmarks/collectives.py [--sizes 1e3 1e5 1e6 4e6] [--repeats 20]

Both communicators of trainer/ranks/distributed.py run in the same processes, on the same buffers,
alternately, so machine noise hits both alike. Rank 0 prints a table: median time per call
and the ratio gloo / mpi (above 1: mpi4py is faster). This decides the CPU default of
``trainer.backend=auto``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from launcher.env import rank_info  # noqa: E402
from trainer.ranks.distributed import MPIComm, TorchDistComm  # noqa: E402


def timed(fn, repeats: int, barrier) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, each started together on all ranks."""
    times = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e3, 1e4, 1e5, 2.5e5, 1e6, 4e6],
                        help="float32 elements per call (1e6 = 4 MB, the MLP's ip2 gradient)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = rank_info(os.environ)
    mpi = MPIComm(info)
    gloo = TorchDistComm(info, "gloo", multi_node=False)
    rows = []
    for size in args.sizes:
        n = int(size)
        buf = torch.ones(n)
        result = {}
        for name, comm in (("mpi", mpi), ("gloo", gloo)):
            comm.allreduce_sum_([buf])  # warm-up, connections
            result[f"{name}_allreduce"] = timed(lambda c=comm, b=buf: c.allreduce_sum_([b]), args.repeats, mpi.barrier)
            result[f"{name}_bcast"] = timed(lambda c=comm, b=buf: c.broadcast_([b], 0), args.repeats, mpi.barrier)
        rows.append((n, result))
    if info.rank == 0:
        print(f"{info.world_size} ranks, float32, median of {args.repeats} calls")
        print("| elements | MB | mpi allreduce ms | gloo allreduce ms | gloo/mpi | mpi bcast ms | gloo bcast ms | gloo/mpi |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, r in rows:
            print(f"| {n} | {n * 4 / 1e6:.3g} | {r['mpi_allreduce'] * 1e3:.3f} | {r['gloo_allreduce'] * 1e3:.3f} | "
                  f"{r['gloo_allreduce'] / r['mpi_allreduce']:.2f} | {r['mpi_bcast'] * 1e3:.3f} | "
                  f"{r['gloo_bcast'] * 1e3:.3f} | {r['gloo_bcast'] / r['mpi_bcast']:.2f} |")


if __name__ == "__main__":
    main()
