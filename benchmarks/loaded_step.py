"""K-FAC's step on a shared CPU: idle, then with a CPU burner process beside it, back to back.

    python benchmarks/loaded_step.py                       # the trainer's thread choice and the old one: ~3 min
    python benchmarks/loaded_step.py --settings chosen --rounds 3 --steps 20

Each setting runs in a fresh worker process (the OpenMP wait policy is read when torch loads),
which trains LBANN's K-FAC MLP recipe (factors and inverses every step, batch 100, real MNIST)
and times each step. The parent alternates, ``--rounds`` times: a block of ``--steps`` steps
with the machine as it is, then a block with a burner process spinning beside the run (one
core taken: on a 2-core machine, half of it), so the drift of a shared machine hits both alike.
It prints a Markdown table: median step time idle and loaded, and their ratio.

Settings:

- ``chosen``: what ``kfac.py`` does now (``launcher/env.py``): threads from the CPU affinity and
  the ranks per node, the OpenMP wait policy passive.
- ``old``: as before: a thread per core, OpenMP's default waits (spin a while, then sleep).
- ``active``: a thread per core, OpenMP's active waits (spin until the work comes).
- ``one``: one thread (``trainer.num_threads=1``), passive waits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # threads: auto (launcher/env.py's choice), cores (one per core) or a number; env: None = unset
    "chosen": {"threads": "auto", "env": {}},
    "old": {"threads": "cores", "env": {"OMP_WAIT_POLICY": None}},
    "active": {"threads": "cores", "env": {"OMP_WAIT_POLICY": "ACTIVE"}},
    "one": {"threads": "1", "env": {}},
}


def worker(threads: str, steps: int, blocks: int, policy: bool) -> None:
    """Trains ``blocks`` blocks of ``steps`` K-FAC steps; after each, prints its step times as
    a JSON line and waits for a line on stdin (the parent starts or stops the burner meanwhile)."""
    sys.path.insert(0, str(ROOT))
    from launcher.env import apply_thread_policy, threads_per_rank

    if policy:
        apply_thread_policy(os.environ)  # what kfac.py does before torch is imported
    import torch

    from kfac_callback import KFACCallback
    from models import build_model
    from trainer.data.mnist import load_mnist

    count = {"auto": threads_per_rank(None, 1), "cores": os.cpu_count() or 1}.get(threads) or int(threads)
    torch.set_num_threads(count)
    torch.manual_seed(0)
    data = load_mnist(max_train_samples=2000, max_test_samples=10, fetch=False)
    model = build_model("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = KFACCallback(model, damping_act=0.01, damping_err=1.0, printer=lambda line: None)
    batches = [(data.train_x[i:i + 100], data.train_y[i:i + 100]) for i in range(0, 2000, 100)]
    print(json.dumps({"threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY")}), flush=True)
    step = 0
    for _ in range(blocks):
        times = []
        for _ in range(steps + 2):  # the first two of a block settle the new load
            x, y = batches[step % len(batches)]
            start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            cb.step()
            optimizer.step()
            times.append(time.perf_counter() - start)
            step += 1
        print(json.dumps(times[2:]), flush=True)
        sys.stdin.readline()


def burner() -> subprocess.Popen:
    """A process that spins on one core until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(setting: str, steps: int, rounds: int) -> dict:
    """Idle and loaded step times of one setting, alternating ``rounds`` times."""
    spec = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update({k: v for k, v in spec["env"].items() if v is not None})
    policy = [] if "OMP_WAIT_POLICY" in spec["env"] else ["--policy"]
    proc = subprocess.Popen([sys.executable, __file__, "--worker", spec["threads"], "--steps", str(steps),
                             "--blocks", str(2 * rounds), *policy], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    info = json.loads(proc.stdout.readline())
    idle, loaded, hot = [], [], None
    try:
        for block in range(2 * rounds):
            (loaded if hot else idle).extend(json.loads(proc.stdout.readline()))
            if hot:
                hot.kill()
                hot.wait()
                hot = None
            if block % 2 == 0:
                hot = burner()
                time.sleep(0.5)  # let it take its core
            proc.stdin.write("\n")
            proc.stdin.flush()
    finally:
        if hot:
            hot.kill()
            hot.wait()
        proc.wait(timeout=60)
    idle_ms, loaded_ms = 1e3 * statistics.median(idle), 1e3 * statistics.median(loaded)
    return {"setting": setting, **info, "idle_ms": idle_ms, "loaded_ms": loaded_ms, "ratio": loaded_ms / idle_ms,
            "steps": len(idle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="chosen,old,active,one", help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=15, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="idle/loaded pairs of blocks per setting")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--policy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.blocks, args.policy)
        return
    print(f"cores in this process's affinity: {len(os.sched_getaffinity(0))}; load average before: "
          f"{os.getloadavg()[0]:.2f}")
    print("| setting | threads | OMP_WAIT_POLICY | idle step (ms) | loaded step (ms) | loaded / idle | steps each |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        r = measure(setting, args.steps, args.rounds)
        print(f"| {setting} | {r['threads']} | {r['wait_policy'] or '(unset)'} | {r['idle_ms']:.1f} | "
              f"{r['loaded_ms']:.1f} | {r['ratio']:.2f}x | {r['steps']} |", flush=True)


if __name__ == "__main__":
    main()
