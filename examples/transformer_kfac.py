"""A user's own transformer trained with K-FAC from a plain loop (and under torchrun, with DDP).

MNIST images read as sequences of 28 rows of 28 pixels: a Linear embedding of each row, a learned
position embedding (nn.Embedding), two nn.TransformerEncoderLayer (PyTorch's attention: the
callback swaps in its own, same parameters and outputs), mean pooling and a Linear head. Every
layer type here is preconditioned: Linear on tokens (kfac.weight_sharing: expand or reduce),
Embedding, LayerNorm, the attention's projections; the setup lines say so.

    python examples/transformer_kfac.py --steps 100                          # about 50 s on a CPU core
    torchrun --nproc-per-node 2 examples/transformer_kfac.py --steps 100     # 2 ranks: the same numbers
"""
import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kfac_callback import KFACCallback  # noqa: E402
from trainer.data.mnist import load_mnist  # noqa: E402


class RowTransformer(nn.Module):
    """Rows of an image as tokens; class logits from the mean token."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(28, width)
        self.position = nn.Embedding(28, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = images.reshape(len(images), 28, 28)
        positions = torch.arange(28, device=images.device).expand(len(images), 28)  # a batch dimension: per-sample rows
        tokens = self.embed(rows) + self.position(positions)
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--batch", type=int, default=100, help="global batch")
parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
parser.add_argument("--weight-sharing", choices=["expand", "reduce"], default="expand")
parser.add_argument("--save", help="write the final weights here (rank 0)")
args = parser.parse_args()

cuda = torch.cuda.is_available()
if "RANK" in os.environ:  # started by torchrun
    dist.init_process_group("nccl" if cuda else "gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
dtype = getattr(torch, args.dtype)
data = load_mnist(None, args.steps * args.batch, 1000)
torch.manual_seed(0)  # the same initial weights on every rank
model = RowTransformer().to(device, dtype)
if world > 1:
    model = nn.parallel.DistributedDataParallel(model)
# KL-clipping sizes each update (docs/algorithm.md §5): without it, transformers diverged here
# at every damping from 0.01 to 0.1 and learning rate from 0.003 to 0.03.
kfac = KFACCallback(model, damping_act=0.01, damping_err=0.01, damping_bn_act=0.01, damping_bn_err=0.01,
                    use_pi=True, kronecker_decay=0.95, compute_interval_steps=5, kl_clip=0.001,
                    weight_sharing=args.weight_sharing, inverse_dtype=args.dtype)
for line in kfac.setup_lines():
    kfac.say(line)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
n = args.batch // world  # this rank's share of every batch (the batch must split evenly)
for step in range(args.steps):
    start = step * args.batch + rank * n
    x, y = data.train_x[start:start + n].to(device, dtype), data.train_y[start:start + n].to(device)
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    kfac.step(learning_rate=optimizer.param_groups[0]["lr"])
    optimizer.step()
    if rank == 0 and (step + 1) % 25 == 0:
        print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)
with torch.no_grad():
    inner = kfac.model.eval()
    accuracy = (inner(data.test_x.to(device, dtype)).argmax(1).cpu() == data.test_y).double().mean()
if rank == 0:
    if args.save:
        torch.save(kfac.model.state_dict(), args.save)
    print(f"test accuracy {100 * accuracy.item():.2f}% on {len(data.test_y)} images")
if dist.is_initialized():
    dist.barrier()
    del kfac, model, optimizer  # DDP's reducer holds the group: release it before the group
    gc.collect()
    dist.destroy_process_group()
