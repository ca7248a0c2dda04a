"""One rank of a real MPI job for tests/trainer/test_ranks.py (not collected by pytest).

    mpiexec -n 4 python -m mpi4py tests/trainer/rank_job.py OUT_DIR override ...

For each owner strategy in ``--strategies`` (one job runs them all, to pay the start-up
once), trains the composed config from the same seed and writes rank 0's final weights to
``OUT_DIR/<strategy>.pt``. Every rank checks that its weights equal rank 0's, bitwise.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402

from launcher.env import rank_info  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.run import build_trainer  # noqa: E402


def weights_checksum(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def main() -> None:
    out_dir, *overrides = sys.argv[1:]
    strategies = ["all"]
    for item in list(overrides):
        if item.startswith("strategies="):
            strategies = item.split("=", 1)[1].split(",")
            overrides.remove(item)
    ConfigStore.instance().store(name="schema", node=Config)
    info = rank_info(os.environ)
    nodes = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("launcher.nodes=")), 1)
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        for strategy in strategies:
            cfg = compose(config_name="config", overrides=[
                *overrides, f"kfac.inverse_strategy={strategy}",
                f"launcher.procs_per_node={info.world_size // nodes}"])
            trainer = build_trainer(cfg, None, info)
            trainer.fit()
            flat = weights_checksum(trainer.model)
            reference = flat.clone()
            trainer.comm.broadcast_([reference], src=0)
            if not torch.equal(flat, reference):
                raise SystemExit(f"rank {info.rank}: weights differ from rank 0's after {strategy}")
            if info.rank == 0:
                torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                           os.path.join(out_dir, f"{strategy}.pt"))
            trainer.comm.barrier()


if __name__ == "__main__":
    main()
