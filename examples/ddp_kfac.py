"""K-FAC in a plain DDP loop on MNIST (LBANN's K-FAC recipe: MLP, SGD lr 0.1, damping 0.01 / 1).

    torchrun --nproc-per-node 2 examples/ddp_kfac.py --steps 50     # 2 ranks, gloo on CPUs, nccl on GPUs
    python examples/ddp_kfac.py --steps 50                            # 1 process: the same numbers
"""
import argparse
import contextlib
import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kfac_callback import KFACCallback  # noqa: E402
from models import build_model  # noqa: E402
from trainer.data.mnist import load_mnist  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
parser.add_argument("--batch", type=int, default=100, help="global batch")
parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
parser.add_argument("--save", help="write the final weights here (rank 0)")
args = parser.parse_args()

cuda = torch.cuda.is_available()
if "RANK" in os.environ:  # started by torchrun
    dist.init_process_group("nccl" if cuda else "gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
dtype = getattr(torch, args.dtype)
data = load_mnist(None, args.steps * args.batch, 1)
torch.manual_seed(42)  # the same initial weights on every rank
model = build_model("mlp").to(device, dtype)
if world > 1:
    model = torch.nn.parallel.DistributedDataParallel(model)
# Its communicator: the process group; layer names without DDP's "module." prefix.
kfac = KFACCallback(model, damping_act=0.01, damping_err=1.0, inverse_dtype=args.dtype,
                    accumulate_steps=args.accumulate)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
n = args.batch // world  # this rank's share of every batch (the batch must split evenly)
for step in range(args.steps):
    start = step * args.batch + rank * n
    x = data.train_x[start:start + n].to(device, dtype)
    y = data.train_y[start:start + n].to(device)
    optimizer.zero_grad()
    loss = 0.0
    for i, (xm, ym) in enumerate(zip(x.chunk(args.accumulate), y.chunk(args.accumulate), strict=True)):
        # DDP all-reduces at the last micro-batch's backward only; each loss weighted by its share.
        with model.no_sync() if world > 1 and i < args.accumulate - 1 else contextlib.nullcontext():
            micro = F.cross_entropy(model(xm), ym) * len(ym) / n
            micro.backward()
        loss += micro.detach()
    kfac.step()
    optimizer.step()
loss = torch.as_tensor(loss, dtype=torch.float64, device=device)
if world > 1:
    dist.all_reduce(loss)
if rank == 0:
    if args.save:
        torch.save(kfac.model.state_dict(), args.save)
    print(f"final loss {loss.item() / world:.10g}")
if dist.is_initialized():
    # Tear down together, after rank 0 has saved: a gloo group destroyed while a peer is
    # still connected can abort that rank's process on exit.
    dist.barrier()
    del kfac, model, optimizer  # DDP's reducer holds the group: release it before the group
    gc.collect()  # the callback and the model's hooks refer to each other: free them now, not at exit
    dist.destroy_process_group()
