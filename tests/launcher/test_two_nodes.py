"""Two emulated nodes for real (launcher.cluster.slurm_cluster): ranks across nodes equal one rank, a lost
node ends the job with one line, and a resubmitted job finishes with an uninterrupted run's numbers.

Each node is a network namespace with its own host name and address, running Debian's slurmd;
the jobs are submitted with ``kfac.py --batch-job launcher=slurm --nodes 2``, as a user would.
Skipped (with the reason) where SLURM is missing or namespaces cannot be made (not root).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from launcher.cluster import netns
from launcher.cluster.slurm_cluster import EmulatedCluster
from launcher.cluster.slurm_daemons import missing_programs
from trainer.checkpoint import load_checkpoint, newest_checkpoint

ROOT = Path(__file__).resolve().parent.parent.parent
# The README's K-FAC recipe in float64 on a fixed slice of real MNIST: 20 steps an epoch.
RECIPE = ["--kfac", "trainer.mini_batch_size=100", "data.max_train_samples=2000", "data.max_test_samples=200",
          "trainer.dtype=float64", "optimizer=sgd", "optimizer.learning_rate=0.1", "kfac.damping_act=[0.01]",
          "kfac.damping_err=[1.0]", "kfac.inverse_dtype=float64", "trainer.flush_denormal=false"]
TWO_NODES = ["launcher=slurm", "--nodes", "2", "--procs-per-node", "2", "launcher.time_limit=10"]

reason = ", ".join(missing_programs()) and f"needs SLURM ({', '.join(missing_programs())} missing: .ci/install-slurm)"
reason = reason or netns.unsupported_reason()
pytestmark = pytest.mark.skipif(bool(reason), reason=reason or "")


@pytest.fixture(scope="module")
def cluster():
    with EmulatedCluster(nodes=2, cpus=4, cred_expire_s=5) as c:  # a requeued job restarts in seconds
        yield c


def kfac(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def submit(exp: Path, *args: str) -> tuple[Path, str]:
    """(work dir, job id) of a batch job submitted through kfac.py."""
    result = kfac("--batch-job", *TWO_NODES, f"launcher.experiment_dir={exp}", *args)
    out = result.stdout + result.stderr
    work_dir = re.search(r"work dir: (\S+)", out)
    job = re.search(r"submitted batch job (\d+)", out)
    assert work_dir and job, out
    return Path(work_dir.group(1)), job.group(1)


def run_or_show(argv: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``argv``; a run past ``timeout`` fails the test with what it printed."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{argv[:12]} ran past {timeout} s:\n{err.stdout}\n{err.stderr}")


def reference(tmp: Path, *args: str) -> dict[str, torch.Tensor]:
    """One rank's final weights, trained right here."""
    result = kfac(f"launcher.experiment_dir={tmp}", *args)
    out = result.stdout + result.stderr
    return final_weights(Path(re.search(r"work dir: (\S+)", out).group(1)))


def final_weights(work_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(newest_checkpoint(work_dir))["model"]


def relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


def logs(work_dir: Path) -> str:
    return (work_dir / "out.log").read_text() + (work_dir / "err.log").read_text()


def test_four_ranks_on_two_nodes_equal_one_rank_in_a_batch_job_and_in_an_allocation(cluster, tmp_path):
    """MPI in a batch job (sbatch, srun inside it); gloo in an allocation (salloc on the login host,
    then kfac.py, which starts the ranks with srun), whose rendezvous is on rank 0's node address."""
    work_dir, job = submit(tmp_path, *RECIPE, "--num_epochs", "1", "trainer.backend=mpi", "launcher.job_name=mpi")
    with ThreadPoolExecutor(max_workers=1) as pool:  # the reference, independent of the jobs, beside them
        one = pool.submit(reference, tmp_path / "one", *RECIPE, "--num_epochs", "1")
        allocation = run_or_show(cluster.login_argv([
            "salloc", "--nodes", "2", "--ntasks-per-node", "2", sys.executable, str(ROOT / "kfac.py"), "--nodes", "2",
            "--procs-per-node", "2", *RECIPE, "--num_epochs", "1", "trainer.backend=gloo",
            f"launcher.experiment_dir={tmp_path}", "launcher.job_name=gloo"]),
            env=cluster.env())
        one = one.result()
    assert allocation.returncode == 0, allocation.stdout[-3000:] + allocation.stderr[-3000:]
    runs = {"gloo": Path(re.search(r"work dir: (\S+)", allocation.stdout + allocation.stderr).group(1)),
            "mpi": work_dir}
    assert cluster.wait_for_job(job, timeout_s=240) == "COMPLETED", logs(work_dir)
    for backend, run_dir in runs.items():
        out = (run_dir / "out.log").read_text()
        # The ranks really ran 2 per node, with local ranks counted per node.
        for line in ("rank 0/4: host node1, local rank 0", "rank 1/4: host node1, local rank 1",
                     "rank 2/4: host node2, local rank 0", "rank 3/4: host node2, local rank 1"):
            assert line in out, (backend, out[:2000])
        # Every peer's address has a name in the cluster (no failed reverse lookups).
        assert "cannot be retrieved" not in (run_dir / "err.log").read_text(), backend
        difference = relative_difference(final_weights(run_dir), one)
        print(f"2 nodes x 2 ranks, {backend}: weights within {difference:.2e} of one rank's")
        assert difference < 1e-9, backend


@pytest.mark.parametrize("backend", ["gloo", pytest.param("mpi", marks=pytest.mark.slow)])
def test_a_lost_node_ends_the_job_in_one_line_and_with_mpi_a_resubmitted_job_finishes(cluster, tmp_path, backend):
    """gloo's survivors see the connection reset; MPI's wait in the collective until the step
    watchdog or SLURM's SIGTERM wakes them (or one crashes inside UCX: another then reports), and
    one survivor names the lost ranks and their node (benchmarks/node_loss.py counts 20 in a row).
    The resubmission runs with MPI only (slow): resuming is the same whatever the communicator, and
    tests/trainer/test_resume.py resumes killed 4-rank jobs by default."""
    recipe = [*RECIPE, "data.max_train_samples=1000"]  # 10 steps an epoch
    args = [*recipe, "--num_epochs", "2", "trainer.checkpoint_every_epoch=true", "trainer.step_timeout_s=10",
            f"trainer.backend={backend}", f"launcher.job_name=lost{backend}"]
    work_dir, job = submit(tmp_path, *args)
    deadline = time.monotonic() + 240
    while newest_checkpoint(work_dir) is None:  # the end of epoch 1
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING"), logs(work_dir)
        time.sleep(0.2)
    lost_at = time.monotonic()
    killed = cluster.kill_node("node2")
    assert killed
    state = cluster.wait_for_job(job, timeout_s=120)
    ended_after = time.monotonic() - lost_at
    assert ended_after < 60, ended_after
    assert state in ("FAILED", "NODE_FAIL"), state  # SLURM records the failure
    errors = [line for line in (work_dir / "err.log").read_text().splitlines() if line.startswith("kfac.py:")]
    assert len(errors) == 1 and "(node2)" in errors[0], logs(work_dir)  # one line, never one per rank
    print(f"node lost: the job ended {ended_after:.1f} s later ({state}): {errors[0]}")
    cluster.start_node("node2")
    if backend != "mpi":
        return

    work_dir2, job2 = submit(tmp_path, *args, "trainer.resume=latest")
    # The reference trains only now, beside the resumed job (independent of it): beside the
    # first job it would take the cores, and that job could finish before the poll above saw
    # its first checkpoint.
    uninterrupted = reference(tmp_path / "one", *recipe, "--num_epochs", "2")
    assert cluster.wait_for_job(job2, timeout_s=240) == "COMPLETED", logs(work_dir2)
    assert "resumed from" in (work_dir2 / "out.log").read_text()
    difference = relative_difference(final_weights(work_dir2), uninterrupted)
    print(f"resumed after the lost node: weights within {difference:.2e} of the uninterrupted run's")
    assert difference < 1e-9


def test_a_start_up_that_hangs_in_mpi_init_ends_with_one_line(tmp_path, monkeypatch):
    """Nodes sharing one spool folder share slurmstepd's PMI-2 socket there: MPI_Init never returns."""
    with EmulatedCluster(nodes=2, cpus=4, spool_per_node=False) as broken:
        monkeypatch.setenv("KFAC_START_TIMEOUT_S", "5")
        work_dir, job = submit(tmp_path, "--num_epochs", "1", "data.max_train_samples=200")
        started = time.monotonic()
        assert broken.wait_for_job(job, timeout_s=60) == "FAILED", logs(work_dir)
        errors = [line for line in (work_dir / "err.log").read_text().splitlines() if line.startswith("kfac.py:")]
        assert errors == ["kfac.py: error: rank 0/4 on node1: MPI_Init did not return in 5 s (the PMI server "
                          "never answered); the job ends"], logs(work_dir)
        assert time.monotonic() - started < 30


@pytest.mark.slow
def test_every_inverse_strategy_on_two_nodes_equals_one_rank(cluster, tmp_path):
    """One srun step across both nodes trains with each owner strategy in turn (tests/trainer/rank_job.py)."""
    common = ["trainer.epochs=1", "trainer.mini_batch_size=100", "data.max_train_samples=2000",
              "data.max_test_samples=100", "trainer.dtype=float64", "kfac.enabled=true", "optimizer=sgd",
              "optimizer.learning_rate=0.1", "kfac.damping_act=[0.01]", "kfac.damping_err=[1.0]",
              "kfac.inverse_dtype=float64", "trainer.flush_denormal=false"]
    job_py = str(ROOT / "tests/trainer/rank_job.py")
    (tmp_path / "one").mkdir()
    one = subprocess.run([sys.executable, job_py, str(tmp_path / "one"), *common, "strategies=all"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    strategies = ["all", "each", "root", "balanced"]
    step = ["srun", "--mpi=pmi2", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=2", sys.executable,
            "-m", "mpi4py", job_py, str(tmp_path), *common, "launcher.nodes=2", "strategies=" + ",".join(strategies)]
    sbatch = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", f"--output={tmp_path}/out.log",
                             "--wrap", " ".join(step)], capture_output=True, text=True, env=cluster.env(), timeout=30)
    assert sbatch.returncode == 0, sbatch.stderr
    assert cluster.wait_for_job(sbatch.stdout.strip(), timeout_s=600) == "COMPLETED", (tmp_path / "out.log").read_text()
    reference = torch.load(tmp_path / "one" / "all.pt")
    for strategy in strategies:
        assert relative_difference(torch.load(tmp_path / f"{strategy}.pt"), reference) < 1e-9, strategy


@pytest.mark.slow
def test_usr1_reaches_every_rank_on_both_nodes_and_the_requeued_job_resumes(cluster, tmp_path):
    args = [*RECIPE, "--num_epochs", "2", "launcher.requeue=true", "trainer.checkpoint_every_steps=5",
            "launcher.job_name=preempt"]
    work_dir, job = submit(tmp_path, *args)
    uninterrupted = reference(tmp_path / "one", *RECIPE, "--num_epochs", "2")
    deadline = time.monotonic() + 240
    while newest_checkpoint(work_dir) is None:
        assert time.monotonic() < deadline, logs(work_dir)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env(), check=True, timeout=30)
    assert cluster.wait_for_job(job, timeout_s=400) == "COMPLETED", logs(work_dir)
    out = (work_dir / "out.log").read_text()
    stops = re.findall(r"trainer: stopped by SIGUSR1 at step (\d+)", out)
    assert len(stops) == 1 and "requeueing job" in out, out  # one consistent stop, one checkpoint
    assert f"step_{int(stops[0]):06d}.pt: step {stops[0]}" in out  # the requeued job resumed there
    assert relative_difference(final_weights(work_dir), uninterrupted) < 1e-9


@pytest.mark.slow
def test_twenty_two_node_jobs_in_a_row_all_complete(cluster, tmp_path):
    for i in range(20):
        work_dir, job = submit(tmp_path, "--num_epochs", "1", "data.max_train_samples=400",
                               "data.max_test_samples=100", f"launcher.job_name=row{i}")
        assert cluster.wait_for_job(job, timeout_s=240) == "COMPLETED", (i, logs(work_dir))
