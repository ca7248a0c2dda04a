"""Node losses in a row on two emulated SLURM nodes: how many end with one line of ours naming the node.

Each round submits a 4-rank job (2 nodes x 2 ranks) through ``kfac.py --batch-job``, waits until it
trains (its first checkpoint, then a random 0-2 s so the loss lands anywhere in a step), kills
every process of node2 (slurmd, slurmstepd, the ranks) and waits for the job to end. It then reads
the job's err.log: the lines of ours (``kfac.py: ...``), whether they name node2, and whatever else
ended it (a backtrace, SLURM's ``Node failure`` line). node2 is started again for the next round.

    python benchmarks/node_loss.py --runs 20                   # 20 with MPI, then 20 with gloo
    python benchmarks/node_loss.py --runs 5 --backends gloo --out /tmp/loss.md

Needs root, network namespaces and SLURM (.ci/install-slurm), as the two-node tests do. Writes a
table (markdown) to ``--out`` and one line per round as it goes.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.cluster.slurm_cluster import EmulatedCluster  # noqa: E402
from trainer.checkpoint import newest_checkpoint  # noqa: E402

# Small and quick: the MLP with K-FAC, 10 steps an epoch, a checkpoint each epoch, many epochs.
RECIPE = ["--kfac", "trainer.mini_batch_size=100", "data.max_train_samples=1000", "data.max_test_samples=200",
          "--num_epochs", "200", "trainer.checkpoint_every_epoch=true", "trainer.step_timeout_s=10",
          "launcher=slurm", "--nodes", "2", "--procs-per-node", "2", "launcher.time_limit=10"]
LOST = "node2"


@dataclass
class Outcome:
    """What one node loss left behind."""

    backend: str
    state: str  # SLURM's final job state
    ended_after_s: float  # from the fault to the job's end
    ours: list[str]  # the lines of ours (kfac.py: ...) in err.log
    backtrace: bool  # a backtrace (a crash in a library) in err.log
    slurm_line: bool  # SLURM's own "Node failure on node2"
    fault: str = "kill"  # node2's processes killed, or its link cut

    @property
    def one_line(self) -> bool:
        """Exactly one line of ours, and it names the lost node."""
        return len(self.ours) == 1 and LOST in self.ours[0]

    def summary(self) -> str:
        what = self.ours[0][:160] if self.ours else "no line of ours"
        extra = ", backtrace" if self.backtrace else ""
        return (f"{self.backend}, {self.fault}: {self.state} {self.ended_after_s:.1f} s after the fault, "
                f"{len(self.ours)} line(s){extra}: {what}")


def kfac(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), *args], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"kfac.py failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout + result.stderr


def lose_node(cluster: EmulatedCluster, exp: Path, backend: str, name: str, rng: random.Random,
              env: dict[str, str] | None = None, fault: str = "kill") -> Outcome:
    """One round: submit, wait for training, kill node2 (``fault="cut"``: take its link down),
    wait for the end, read err.log."""
    out = kfac("--batch-job", *RECIPE, f"trainer.backend={backend}", f"launcher.experiment_dir={exp}",
               f"launcher.job_name={name}", env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    work_dir = Path(re.search(r"work dir: (\S+)", out).group(1))
    job = re.search(r"submitted batch job (\d+)", out).group(1)
    deadline = time.monotonic() + 240
    while newest_checkpoint(work_dir) is None:
        if time.monotonic() > deadline or cluster.job_state(job) not in ("PENDING", "RUNNING"):
            raise RuntimeError(f"job {job} did not reach its first checkpoint: {(work_dir / 'err.log').read_text()}")
        time.sleep(0.2)
    time.sleep(rng.uniform(0.0, 2.0))
    lost_at = time.monotonic()
    if fault == "kill":
        cluster.kill_node(LOST)
    else:  # a cut link: node2's ranks live on, out of reach, until SLURM ends the job or the link is back
        cluster.cut_link(LOST)
    state = cluster.wait_for_job(job, timeout_s=180)
    if fault == "cut":
        cluster.cut_link(LOST, up=True)
        cluster.kill_node(LOST)  # node2 starts afresh for the next round
    ended = time.monotonic() - lost_at
    time.sleep(1.0)  # the batch script's last lines
    err = (work_dir / "err.log").read_text(errors="replace")
    return Outcome(backend, state, ended, [ln for ln in err.splitlines() if ln.startswith("kfac.py:")],
                   backtrace=bool(re.search(r"backtrace|Segmentation fault|Traceback", err, re.I)),
                   slurm_line=f"Node failure on {LOST}" in err, fault=fault)


def stress(cluster: EmulatedCluster, exp: Path, backend: str, runs: int, seed: int = 0,
           env: dict[str, str] | None = None, fault: str = "kill") -> list[Outcome]:
    """``runs`` node losses with ``backend`` (``env``: added to the jobs' environment; ``fault``: kill
    or cut, as ``lose_node``); node2 back up after each."""
    rng = random.Random(seed)
    outcomes = []
    for i in range(runs):
        outcome = lose_node(cluster, exp, backend, f"{fault}-{backend}-{i}", rng, env, fault)
        print(f"[{i + 1}/{runs}] {outcome.summary()}", flush=True)
        outcomes.append(outcome)
        cluster.start_node(LOST)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    rows = ["| communicator | fault | rounds | one line naming node2 | no line of ours | more than one | backtrace "
            "| job ended after the fault (s): median, max |", "|---|---|---|---|---|---|---|---|"]
    for backend, fault in dict.fromkeys((o.backend, o.fault) for o in outcomes):
        mine = [o for o in outcomes if (o.backend, o.fault) == (backend, fault)]
        times = sorted(o.ended_after_s for o in mine)
        rows.append(f"| {backend} | {fault} | {len(mine)} | {sum(o.one_line for o in mine)} | {sum(not o.ours for o in mine)} "
                    f"| {sum(len(o.ours) > 1 for o in mine)} | {sum(o.backtrace for o in mine)} "
                    f"| {times[len(times) // 2]:.1f}, {times[-1]:.1f} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="node losses per communicator (default 20)")
    parser.add_argument("--backends", nargs="+", default=["mpi", "gloo"], choices=["mpi", "gloo"])
    parser.add_argument("--out", type=Path, help="write the table (and every round's line) here")
    parser.add_argument("--fault", choices=["kill", "cut"], default="kill",
                        help="kill every process of node2 (default), or cut its network link")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="added to the jobs' environment")
    parser.add_argument("--keep", type=Path, help="keep the jobs' work dirs under this folder")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on the way out
    env = dict(item.split("=", 1) for item in args.env)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="node-loss-") as tmp, EmulatedCluster(nodes=2, cpus=4, cred_expire_s=5) as cluster:
        for backend in args.backends:
            outcomes += stress(cluster, args.keep or Path(tmp), backend, args.runs, env=env, fault=args.fault)
    text = table(outcomes)
    print(text)
    if args.out:
        rounds = "\n".join(f"- {o.summary()}" for o in outcomes)
        args.out.write_text(f"{text}\nEach round:\n\n{rounds}\n")
    return 0 if all(o.one_line for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
