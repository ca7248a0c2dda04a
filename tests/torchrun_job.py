"""One rank of a real torchrun job for tests/test_torchrun.py (not collected by pytest).

    torchrun --nproc-per-node 2 tests/torchrun_job.py OUT_DIR

On real MNIST in float64, with a DistributedDataParallel MLP and the K-FAC callback taking its
communicator from the process group, each rank writes ``OUT_DIR/rank<R>.json`` with:

- ``accumulate``: the largest relative difference of factors, owned inverses and preconditioned
  gradients between 2 micro-batches a step (DDP's ``no_sync`` on the first) and one process on
  the whole global batch (no accumulation);
- ``resume``: the largest relative difference of the weights and factors between a run of 6
  steps and one that saves every state after 3 (``state_dict`` of model, optimizer and K-FAC,
  through a file), starts afresh and loads them;
- ``names``: the K-FAC layer names, the state's layer names and the owners' names.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from kfac_callback import KFACCallback  # noqa: E402
from kfac_callback.base import SingleProcess  # noqa: E402
from models import build_model  # noqa: E402
from trainer.data.mnist import load_mnist  # noqa: E402

D = torch.float64
BATCH, STEPS = 60, 6
OPTIONS = {"damping_act": 0.01, "damping_err": 1.0, "inverse_dtype": "float64", "kronecker_decay": 0.9,
           "inverse_strategy": "balanced", "disable_layers": ["module.ip3"], "printer": lambda s: None}


def fresh() -> torch.nn.Module:
    torch.manual_seed(42)
    return build_model("mlp").to(D)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def steps(model, cb, opt, data, first: int, last: int, k: int, rank: int, world: int) -> list[dict]:
    """Steps first..last-1; this rank's n = BATCH / world samples in k micro-batches."""
    n = BATCH // world
    record = []
    for step in range(first, last):
        start = step * BATCH + rank * n
        x, y = data.train_x[start:start + n].to(D), data.train_y[start:start + n]
        opt.zero_grad(set_to_none=True)
        for i, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
            sync = isinstance(model, DDP) and i < k - 1
            with model.no_sync() if sync else contextlib.nullcontext():
                (F.cross_entropy(model(xm), ym) * len(ym) / n).backward()
        cb.step()
        record.append({"grads": {name: p.grad.clone() for name, p in cb.model.named_parameters()},
                       "factors": {name: [m.clone() for m in b.factors()] for name, b in cb.blocks.items()}})
        opt.step()
    return record


def worst(got: list[dict], want: list[dict]) -> float:
    out = 0.0
    for g, w in zip(got, want, strict=True):
        out = max(out, *(relative(g["grads"][k], v) for k, v in w["grads"].items()))
        out = max(out, *(relative(a, b) for k, ms in w["factors"].items() for a, b in zip(g["factors"][k], ms, strict=True)))
    return out


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_mnist(None, BATCH * STEPS, 1, fetch=False)
    result: dict = {}

    # 1. Accumulation under DDP (2 micro-batches) against one process on the global batch.
    ref_model = fresh()
    ref_cb = KFACCallback(ref_model, comm=SingleProcess(), **OPTIONS)
    want = steps(ref_model, ref_cb, torch.optim.SGD(ref_model.parameters(), lr=0.1), data, 0, 3, 1, 0, 1)
    model = DDP(fresh())
    cb = KFACCallback(model, accumulate_steps=2, **OPTIONS)
    got = steps(model, cb, torch.optim.SGD(model.parameters(), lr=0.1), data, 0, 3, 2, rank, world)
    inverse = max(relative(getattr(b, f"{f}_inv"), getattr(ref_cb.blocks[name], f"{f}_inv"))
                  for name, b in cb.blocks.items() if cb.owners[name] == rank for f in b.factor_names)
    result["accumulate"] = max(worst(got, want), inverse)
    result["comm"] = [type(cb.comm).__name__, cb.comm.world_size]
    result["names"] = {"blocks": list(cb.blocks), "owners": list(cb.owners),
                       "state": list(cb.state_dict()["factors"]), "model_state": list(cb.model.state_dict())}

    # 2. A resumed DDP run (states through a file) against an uninterrupted one.
    def build() -> tuple[DDP, KFACCallback]:
        model = DDP(fresh())
        return model, KFACCallback(model, accumulate_steps=2, **OPTIONS)

    model, cb = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    whole = steps(model, cb, opt, data, 0, STEPS, 2, rank, world)
    model, cb = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps(model, cb, opt, data, 0, 3, 2, rank, world)
    path = os.path.join(out_dir, "state.pt")
    state = {"model": cb.model.state_dict(), "optimizer": opt.state_dict(), "kfac": cb.state_dict()}
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    del model, cb, opt
    model, cb = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saved = torch.load(path, weights_only=False)
    model.module.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    cb.load_state_dict(saved["kfac"])
    resumed = steps(model, cb, opt, data, 3, STEPS, 2, rank, world)
    result["resume"] = worst(resumed, whole[3:])
    result["resume_moved"] = relative(whole[-1]["grads"]["ip1.weight"], whole[2]["grads"]["ip1.weight"])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # tear the gloo group down together (see examples/ddp_kfac.py)
    del model, cb, opt
    gc.collect()  # the callback and the model's hooks refer to each other: free DDP's reducer first
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
