"""What a K-FAC step costs in a plain loop: fp32, bf16 autocast, k micro-batches, and DDP.

    python benchmarks/plain_loop_step_time.py --model mlp                                      # fp32, bf16, 4 micro-batches
    torchrun --standalone --nproc-per-node 2 benchmarks/plain_loop_step_time.py --model mlp   # the same under DDP

Real MNIST, global batch 100, LBANN's K-FAC recipe (SGD lr 0.1, damping 0.01 / 1). The variants
take turns (rounds of --steps steps each), so a machine busy with something else slows all of
them alike; each line is the median milliseconds per step over every round. The optimizers'
step time, K-FAC's phases and bytes: benchmarks/step_time.py (docs/performance.md).
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kfac_callback import KFACCallback  # noqa: E402
from models import build_model  # noqa: E402
from trainer.data.mnist import load_mnist  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
parser.add_argument("--steps", type=int, default=10, help="steps per variant and round")
parser.add_argument("--rounds", type=int, default=5)
args = parser.parse_args()
if "RANK" in os.environ:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
data = load_mnist(None, 2000, 1)
n = 100 // world
VARIANTS = {"fp32": (None, 1), "bf16 autocast": (torch.bfloat16, 1), "fp32, 4 micro-batches": (None, 4)}


def make(k):
    torch.manual_seed(42)
    model = build_model(args.model)
    model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    kfac = KFACCallback(model, damping_act=0.01, damping_err=1.0, accumulate_steps=k, printer=lambda s: None)
    return model, kfac, torch.optim.SGD(model.parameters(), lr=0.1)


def step(model, kfac, optimizer, dtype, k, i):
    start = (i % 20) * 100 + rank * n
    x, y = data.train_x[start:start + n], data.train_y[start:start + n]
    optimizer.zero_grad()
    for m, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
        sync = world > 1 and m < k - 1
        with model.no_sync() if sync else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
                loss = F.cross_entropy(model(xm), ym) * len(ym) / n
            loss.backward()
    kfac.step()
    optimizer.step()


runs = {name: make(k) for name, (_, k) in VARIANTS.items()}
times = {name: [] for name in VARIANTS}
for r in range(args.rounds + 1):  # round 0 warms up
    for name, (dtype, k) in VARIANTS.items():
        for i in range(args.steps):
            if world > 1:
                dist.barrier()
            t = time.perf_counter()
            step(*runs[name], dtype, k, r * args.steps + i)
            if r:
                times[name].append(time.perf_counter() - t)
if rank == 0:
    where = f"DDP, {world} processes (gloo)" if world > 1 else "1 process"
    for name, ts in times.items():
        print(f"{args.model}, {where}, {name}: {statistics.median(ts) * 1e3:.1f} ms/step "
              f"(median of {len(ts)}, {torch.get_num_threads()} threads per process)")
if dist.is_initialized():
    dist.barrier()  # tear the gloo group down together, after rank 0 has printed
    dist.destroy_process_group()
