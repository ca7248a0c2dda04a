"""Per-step time of SGD, Adam and K-FAC, K-FAC's split into phases, the floor, and bytes sent.

    python benchmarks/step_time.py --model mlp                                  # 1 rank
    python benchmarks/step_time.py --model mlp --device cuda                    # 1 rank on a GPU
    mpiexec -n 4 python -m mpi4py benchmarks/step_time.py --model mlp           # 4 ranks

All optimizers run in the same processes on the same real MNIST batches, taking turns of
``--round`` steps until each has run ``--steps`` timed steps, so the ratios are measured under
the same conditions even when the machine's speed drifts. The global batch is ``--batch`` (100),
split over the ranks. K-FAC runs twice: at LBANN's README recipe (factors and inverses every
step) and at an amortized experiment (``--experiment``: ``configs/experiment/kfac_fast.yaml``, the
recommended one at batch 100, ``kfac_fast_cnn.yaml``, or ``kfac_large_batch.yaml``).

The floor: the kernels one K-FAC step cannot avoid, each timed alone on the layers' sizes
(Gram products of the factors, Cholesky factorisations, explicit inverses, solves and products
of the preconditioning), added to the SGD step. Rank 0 prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from kfac_callback import KFACCallback, make_config  # noqa: E402
from launcher.env import rank_info  # noqa: E402
from models import build_model  # noqa: E402
from trainer.data.mnist import DataError, load_mnist  # noqa: E402
from trainer.optimizers import OptimizerConfig, build_optimizer  # noqa: E402
from trainer.ranks.distributed import make_communicator  # noqa: E402
from trainer.tasks import make_task  # noqa: E402


class CountingComm:
    """Wraps a communicator: counts the bytes each phase of the running optimizer sends (payload per rank)."""

    def __init__(self, comm, runner_of) -> None:
        self.comm, self.runner_of = comm, runner_of
        self.rank, self.world_size, self.local_rank = comm.rank, comm.world_size, comm.local_rank

    def _count(self, tensors) -> None:
        runner = self.runner_of()
        runner.bytes[runner.comm_phase()] += sum(t.numel() * t.element_size() for t in tensors)

    def allreduce_sum_(self, tensors) -> None:
        self._count(tensors)
        self.comm.allreduce_sum_(tensors)

    def broadcast_(self, tensors, src) -> None:
        self._count(tensors)
        self.comm.broadcast_(tensors, src)

    def barrier(self) -> None:
        self.comm.barrier()


EXPERIMENTS = ROOT / "configs" / "experiment"
RECIPE = {"damping_act": [0.01], "damping_err": [1.0]}


def fast_settings(experiment: str = "kfac_fast") -> tuple[str, float, float, dict]:
    """An amortized K-FAC experiment's settings: base optimizer, learning rate, weight decay, K-FAC options."""
    doc = yaml.safe_load((EXPERIMENTS / f"{experiment}.yaml").read_text())
    optimizer = next(d["override /optimizer"] for d in doc["defaults"]
                     if isinstance(d, dict) and "override /optimizer" in d)
    options = {k: v for k, v in doc["kfac"].items() if k != "enabled"}
    return optimizer, float(doc["optimizer"]["learning_rate"]), float(doc["optimizer"].get("weight_decay", 0.0)), options


def mnist_batches(batch: int, rank: int, world: int, count: int = 20) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the first ``count`` global batches of real MNIST (random pixels if absent);
    fewer batches where the training set holds fewer (an empty batch would be no step)."""
    count = max(1, min(count, 60000 // batch))
    try:
        data = load_mnist(max_train_samples=batch * count, fetch=False)
        x, y = data.train_x, data.train_y
    except DataError:
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(batch * count, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch * count,), generator=gen)
    local = batch // world
    shares = [slice(i * batch + rank * local, i * batch + (rank + 1) * local) for i in range(count)]
    return [(x[share], y[share]) for share in shares]


def kernel_ms(fn, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class Kernels:
    """Times of the dense kernels K-FAC needs, measured once per shape (float32)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, float] = {}
        self._spd: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _factor(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n not in self._spd:
            x = torch.randn(max(2 * n, 8), n)
            m = x.mT @ x / x.shape[0] + 0.01 * torch.eye(n)
            self._spd[n] = (m, torch.linalg.cholesky(m))
        return self._spd[n]

    def _time(self, key: tuple, fn) -> float:
        if key not in self._cache:
            self._cache[key] = kernel_ms(fn)
        return self._cache[key]

    def gram(self, rows: int, n: int) -> float:
        x = torch.randn(rows, n)
        return self._time(("gram", rows, n), lambda: x.mT @ x)

    def cholesky(self, n: int) -> float:
        m, _ = self._factor(n)
        return self._time(("chol", n), lambda: torch.linalg.cholesky_ex(m))

    def inverse(self, n: int) -> float:
        _, chol = self._factor(n)
        return self._time(("inv", n), lambda: torch.cholesky_inverse(chol))

    def solve(self, n: int, k: int) -> float:
        _, chol = self._factor(n)
        b = torch.randn(n, k)
        return self._time(("solve", n, k), lambda: torch.linalg.solve_triangular(
            chol.mT, torch.linalg.solve_triangular(chol, b, upper=False), upper=True))

    def gemm(self, m: int, k: int, n: int) -> float:
        a, b = torch.randn(m, k), torch.randn(k, n)
        return self._time(("gemm", m, k, n), lambda: a @ b)


def floor_ms(cb: KFACCallback, n: int, sgd_ms: float, update: int, compute: int, kernels: Kernels) -> float:
    """The SGD step plus the kernels one K-FAC step cannot avoid, amortized over the intervals.

    Per layer: the Gram products of its two factors (÷ update interval), their Cholesky
    factorisations (plus explicit inverses from a compute interval of 5, ÷ compute interval),
    and the preconditioning by the cheaper route: through the batch, ``(G⁻¹Eᵀ)(ÂA⁻¹)``, or
    direct, ``G⁻¹∇W A⁻¹`` (solves with Cholesky factors, GEMMs with explicit inverses).
    """
    explicit = compute >= 5
    total = sgd_ms
    for block in cb.blocks.values():
        if block.kind == "batchnorm":
            continue
        d_out, d_in = block.out_features(), block.in_features() + int(block.has_bias)
        total += (kernels.gram(n, d_in) + kernels.gram(n, d_out)) / update
        total += sum(kernels.cholesky(d) + (kernels.inverse(d) if explicit else 0.0) for d in (d_in, d_out)) / compute
        if explicit:
            batch = kernels.gemm(d_out, d_out, n) + kernels.gemm(n, d_in, d_in) + kernels.gemm(d_out, n, d_in)
            direct = kernels.gemm(d_out, d_out, d_in) + kernels.gemm(d_out, d_in, d_in)
        else:
            batch = kernels.solve(d_out, n) + kernels.solve(d_in, n) + kernels.gemm(d_out, n, d_in)
            direct = kernels.solve(d_out, d_in) + kernels.solve(d_in, d_out)
        through_batch = block.kind == "linear" and block.batch_route_cheaper(n)
        total += min(batch, direct) if through_batch else direct
        if through_batch and not block.has_bias and cb.config.skip_weight_grad:
            total -= kernels.gemm(d_out, n, d_in)  # the weight GEMM backward skips
    return total


class Runner:
    """One optimizer's model, optimizer and (optional) K-FAC callback, stepped on demand."""

    def __init__(self, model_name: str, optimizer_name: str, lr: float, kfac: dict | None, comm, batches,
                 weight_decay: float = 0.0, device: str | torch.device = "cpu") -> None:
        torch.manual_seed(0)
        self.name = f"{optimizer_name} lr {lr:g}" + (" + K-FAC" if kfac else "")
        self.model = build_model(model_name).to(device)
        # A GPU runs ahead of the host: wait for its queue before each clock reading.
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        spec = yaml.safe_load((ROOT / "configs" / "model" / f"{model_name}.yaml").read_text())
        self.task = make_task(spec.get("task", "classification"), float(spec.get("l2", 0.0)))
        self.optimizer = build_optimizer(OptimizerConfig(name=optimizer_name, learning_rate=lr, weight_decay=weight_decay),
                                         self.model.parameters())
        self.cb = None if kfac is None else KFACCallback(self.model, comm=comm, printer=lambda line: None,
                                                         output=self.task.output, l2_reg=self.task.l2, **kfac)
        self.comm, self.batches = comm, batches
        self.params = list(self.model.parameters())
        self.phase = "gradient_allreduce"  # what the communicator is doing for this runner now
        self.phases: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, int] = defaultdict(int)
        self.times: list[float] = []
        self.steps = 0
        self.loss = torch.zeros(())

    def comm_phase(self) -> str:
        cb = self.cb
        return cb.clock.phase if self.phase == "kfac" and cb is not None and cb.clock.phase else self.phase

    def warm_up(self, steps: int) -> None:
        """Untimed steps; K-FAC also runs its factor-interval warm-up, so the steady state is timed."""
        for _ in range(steps + (self.cb.config.update_interval_steps if self.cb else 0)):
            self.step(timed=False)
        self.phases.clear()
        self.bytes.clear()
        if self.cb:
            self.cb.clock.times.clear()

    def step(self, timed: bool) -> None:
        x, y = self.batches[self.steps % len(self.batches)]
        self.steps += 1
        comm = self.comm
        comm.barrier()
        self.sync()
        t0 = time.perf_counter()
        logits = self.model(x)
        targets = self.task.targets(x, y)
        self.loss = self.task.loss_sum(logits, targets) / len(x) + self.task.penalty(self.model)
        if self.cb:
            self.cb.sample_fisher(logits)  # fisher=mc's extra backward on factor steps (else nothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.loss.backward()
        self.sync()
        t1 = time.perf_counter()
        self.phase = "gradient_allreduce"
        if comm.world_size > 1:
            # As the trainer: the gradients backward left (skip_weight_grad leaves some to K-FAC).
            grads = [p.grad for p in self.params if p.grad is not None]
            comm.allreduce_sum_(grads)  # one collective: the communicator packs the list
            for g in grads:
                g /= comm.world_size
        self.sync()
        t2 = time.perf_counter()
        if self.cb:
            self.phase = "kfac"  # the callback names its phases itself (cb.clock.phase)
            self.cb.step(learning_rate=self.optimizer.param_groups[0]["lr"], batch=(x, targets))
        self.optimizer.step()
        self.sync()
        comm.barrier()
        t3 = time.perf_counter()
        if timed:
            self.phases["forward_backward"] += t1 - t0
            self.phases["gradient_allreduce"] += t2 - t1
            self.times.append(t3 - t0)

    def result(self, steps: int) -> dict:
        if not torch.isfinite(self.loss):
            raise SystemExit(f"step_time: the loss diverged ({self.name}); times are meaningless")
        phases = dict(self.phases)
        if self.cb:
            for name, seconds in self.cb.clock.times.items():
                phases[name] = phases.get(name, 0.0) + seconds
        return {"mean": statistics.fmean(self.times), "phases": {k: v / steps for k, v in phases.items()},
                "bytes": dict(self.bytes), "params": sum(p.numel() for p in self.params), "cb": self.cb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn", "autoencoder", "vit", "resnet", "resnet_dw"])
    parser.add_argument("--batch", type=int, default=100, help="global mini-batch")
    parser.add_argument("--steps", type=int, default=100, help="timed steps (the mean is amortized over them)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (plus the interval warm-up)")
    parser.add_argument("--round", type=int, default=10, help="steps of one optimizer before the next one's turn")
    parser.add_argument("--experiment", default="kfac_fast",
                        choices=["kfac_fast", "kfac_fast_cnn", "kfac_large_batch", "kfac_adaptive"],
                        help="the amortized K-FAC recipe timed beside LBANN's (configs/experiment/)")
    parser.add_argument("--experiment-lr", type=float, default=None,
                        help="the experiment's learning rate here (the time does not depend on it; a rate that "
                             "diverges on the repeated batches would make the times meaningless)")
    parser.add_argument("--kfac-set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one of the experiment's kfac options (YAML value), e.g. "
                             "compute_interval_steps=20; repeatable")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: each rank on the GPU of its local rank (one rank: cuda:0)")
    args = parser.parse_args()

    fast_optimizer, fast_lr, fast_decay, fast_options = fast_settings(args.experiment)
    fast_lr = fast_lr if args.experiment_lr is None else args.experiment_lr
    for item in args.kfac_set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--kfac-set: expected KEY=VALUE, got {item!r}")
        fast_options[key] = yaml.safe_load(value)
    try:
        make_config(**fast_options)  # the callback's own check: a line per unknown key or bad value
    except (TypeError, ValueError) as e:
        parser.error(f"--kfac-set: {e}")

    info = rank_info(os.environ)
    torch.set_flush_denormal(True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_size))
    current: dict[str, Runner | None] = {"runner": None}
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")
    device = torch.device("cuda", info.local_rank % torch.cuda.device_count()) if args.device == "cuda" else \
        torch.device("cpu")
    comm = CountingComm(make_communicator(info, device_type=device.type), lambda: current["runner"])
    batches = [(x.to(device), y.to(device)) for x, y in mnist_batches(args.batch, comm.rank, comm.world_size)]
    runners = {
        "sgd": Runner(args.model, "sgd", 0.1, None, comm, batches, device=device),
        "adam": Runner(args.model, "adam", 1e-4, None, comm, batches, device=device),
        "kfac (README recipe)": Runner(args.model, "sgd", 0.1, dict(RECIPE), comm, batches, device=device),
        f"kfac ({args.experiment})": Runner(args.model, fast_optimizer, fast_lr, fast_options, comm, batches, fast_decay,
                                            device),
    }
    for runner in runners.values():
        current["runner"] = runner
        runner.warm_up(args.warmup)
    # Round-robin in rounds of --round steps, so a drift of the machine's speed during the run
    # (common on shared machines) touches every optimizer alike.
    done = 0
    while done < args.steps:
        n = min(args.round, args.steps - done)
        for runner in runners.values():
            current["runner"] = runner
            for _ in range(n):
                runner.step(timed=True)
        done += n
    results = {name: r.result(args.steps) for name, r in runners.items()}
    if comm.rank != 0:
        return
    sgd = results["sgd"]["mean"]
    fast = results[f"kfac ({args.experiment})"]["cb"].config
    where = f"on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else \
        f"{torch.get_num_threads()} thread(s)/rank"
    print(f"### {args.model}, {comm.world_size} rank(s), global batch {args.batch}, {where}, mean of {args.steps} steps\n")
    print(f"{args.experiment}: {fast_optimizer} lr {fast_lr:g}, weight decay {fast_decay:g}, "
          f"update interval {fast.update_interval_init}->"
          f"{fast.update_interval_target} over {fast.update_interval_steps} steps (timed after), compute interval "
          f"{fast.compute_interval_steps}, damping act {fast.damping_act} err {fast.damping_err}\n")
    # The floor counts fully connected layers (Gram products of N rows): the MLP, on one rank.
    kernels = Kernels() if comm.world_size == 1 and args.model == "mlp" and device.type == "cpu" else None
    print("| optimizer | mean step ms | / SGD | floor ms | floor / SGD |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        cells = ["", ""]
        if kernels is not None and r["cb"] is not None:
            c = r["cb"].config
            floor = floor_ms(r["cb"], args.batch, sgd * 1e3, c.update_interval_target, c.compute_interval_steps, kernels)
            cells = [f"{floor:.2f}", f"{floor / (sgd * 1e3):.2f}"]
        print(f"| {name} | {r['mean'] * 1e3:.2f} | {r['mean'] / sgd:.2f} | {cells[0]} | {cells[1]} |")
    for name in ("kfac (README recipe)", f"kfac ({args.experiment})"):
        own = dict(results[name]["phases"])
        own["factors"] = own.get("factors", 0.0) - own.get("factor_allreduce", 0.0)
        own["precondition"] = own.get("precondition", 0.0) - own.get("exchange", 0.0)
        print(f"\n| {name}: phase | ms per step |\n|---|---:|")
        for phase in ("forward_backward", "gradient_allreduce", "factors", "factor_allreduce", "inverses",
                      "batch_gather", "precondition", "exchange", "adaptive"):
            print(f"| {phase} | {own.get(phase, 0.0) * 1e3:.2f} |")
        if comm.world_size > 1:
            print(f"\n| {name}: collective | bytes per step (payload per rank) |\n|---|---:|")
            for phase, total in sorted(results[name]["bytes"].items()):
                print(f"| {phase} | {total / args.steps:,.0f} |")
    if comm.world_size > 1:
        print(f"\nminimum: gradient {results['sgd']['params'] * 4:,} B (one averaged copy); factors: the "
              "packed triangles above (a symmetric matrix needs only its triangle)")
    if kernels is not None:
        print("\nkernels (ms, float32): " + ", ".join(f"{k[0]}{k[1:]} {v:.2f}" for k, v in sorted(kernels._cache.items())))


if __name__ == "__main__":
    main()
