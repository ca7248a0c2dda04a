"""This process's rank, local rank and world size, read from the launcher's environment.

Pure: takes the environment as a mapping. torchrun's variables come first (a torchrun started
by srun or mpiexec, one per node, also sees that launcher's per-node variables), then MPI's
own, because a ``mpiexec`` inside a SLURM allocation leaves SLURM's per-task variables unset
or stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Set by our launcher in every rank's environment: "you are a rank, train; don't launch".
LAUNCHED = "KFAC_LAUNCHED"

# (rank, local rank, world size, local size) variables of each launcher, in priority order.
SOURCES = (
    ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"),  # torchrun (torch.distributed.run)
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE", "MPI_LOCALNRANKS"),
    ("PMIX_RANK", "PMIX_LOCAL_RANK", "PMIX_SIZE", "PMIX_LOCAL_SIZE"),
    ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE"),
)


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits among the ranks of a job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_size: int = 1
    source: str = "none"  # OMPI, PMI, PMIX, SLURM, torchrun or none

    @property
    def torchrun(self) -> bool:
        """Whether torchrun started this process (no MPI world: torch.distributed instead)."""
        return self.source == "torchrun"


def _int(environ: Mapping[str, str], key: str, default: int) -> int:
    value = environ.get(key, "")
    # SLURM writes per-node counts such as "4(x2)"; the leading number is ours.
    digits = value.split("(")[0].split(",")[0]
    return int(digits) if digits.isdigit() else default


def started_by_torchrun(environ: Mapping[str, str]) -> bool:
    """Whether torchrun (or a launcher doing what it does) started this process: RANK,
    LOCAL_RANK and WORLD_SIZE, and the MASTER_ADDR and MASTER_PORT that torch.distributed
    meets at (plain RANK alone is too common a name to mean a job)."""
    return all(k in environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def tasks_on_node(tasks_per_node: str, node: int) -> int | None:
    """The task count of node ``node`` from SLURM's compressed list (``2(x3),1``); None if unreadable."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        count, _, times = part.partition("(x")
        if not count.isdigit() or (times and not times.rstrip(")").isdigit()):
            return None
        counts += [int(count)] * (int(times.rstrip(")")) if times else 1)
    return counts[node] if 0 <= node < len(counts) else None


def _slurm_local(environ: Mapping[str, str], rank: int) -> tuple[int, int] | None:
    """(local rank, local size) from SLURM's task variables, if they describe this rank."""
    if _int(environ, "SLURM_PROCID", -1) != rank or "SLURM_LOCALID" not in environ:
        return None
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
    size = tasks_on_node(per_node, _int(environ, "SLURM_NODEID", 0))
    local = _int(environ, "SLURM_LOCALID", 0)
    return local, size if size is not None else local + 1


def rank_info(environ: Mapping[str, str]) -> RankInfo:
    """Reads rank, local rank and world size from torchrun's RANK/LOCAL_RANK/WORLD_SIZE/
    LOCAL_WORLD_SIZE or the OMPI_*, PMI_*, PMIX_* or SLURM_* variables.

    With none of them set, this is a single process: rank 0 of 1. Where the MPI's variables
    give no local rank (SLURM's PMI-2 sets PMI_RANK and PMI_SIZE only), SLURM's own task
    variables do: the rank's index and count on its node, not in the whole job.
    """
    for rank_key, local_key, size_key, local_size_key in SOURCES:
        if rank_key == "RANK" and not started_by_torchrun(environ):
            continue
        if rank_key in environ and size_key in environ:
            rank = _int(environ, rank_key, 0)
            world = _int(environ, size_key, 1)
            slurm = _slurm_local(environ, rank) if local_key not in environ else None
            local = slurm[0] if slurm else _int(environ, local_key, rank)
            local_size = slurm[1] if slurm else _int(environ, local_size_key, world)
            source = "torchrun" if rank_key == "RANK" else rank_key.split("_")[0]
            return RankInfo(rank, local, world, local_size, source)
    return RankInfo()


def inside_slurm_allocation(environ: Mapping[str, str]) -> bool:
    """True inside ``salloc``/``sbatch``, where ranks are started with ``srun``."""
    return "SLURM_JOB_ID" in environ


# --- threads: how many each rank runs, and how they wait (docs/usage.md, "Threads") -------------


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what SLURM, taskset or a container
    gave it), not every core of the machine."""
    try:
        import os

        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on this platform
        import os

        return os.cpu_count() or 1


def threads_per_rank(num_threads: int | None, local_size: int, cores: int | None = None) -> int:
    """``trainer.num_threads`` if set, else this process's cores shared out over its node's ranks."""
    if num_threads:
        return num_threads
    return max(1, (cores or usable_cores()) // max(1, local_size))


def apply_thread_policy(environ: dict[str, str] | None = None) -> None:
    """Sets OpenMP's passive waits unless the user chose: call it before torch is imported.

    A waiting thread then sleeps instead of spinning, so a spinning thread never takes the core
    its busy sibling (or another job) needs: K-FAC's small parallel regions no longer collapse
    when another process takes a core (benchmarks/loaded_step.py).
    """
    import os

    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
