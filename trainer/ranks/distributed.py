"""Communicators: the collectives the trainer and the K-FAC callback need.

Every communicator offers the same small interface, so code above it never asks which
backend runs underneath and tests can pass a single-process one:

- ``rank``, ``world_size``, ``local_rank``, ``name``
- ``allreduce_sum_(tensors)``: sums a list of tensors over ranks, in place, in ONE collective
- ``broadcast_(tensors, src)``: copies a list of tensors from rank ``src`` to all, in place
- ``barrier()``

Backends: ``mpi`` (mpi4py on CPU tensors; on this project's CPUs several times faster than
gloo, see benchmarks/collectives.py), ``gloo`` (torch.distributed on CPU), ``nccl`` (GPUs,
one device per local rank). ``auto`` picks nccl for CUDA tensors, else mpi; under torchrun,
which starts no MPI world, gloo on CPUs (docs/design.md).
"""

from __future__ import annotations

import atexit
import os
import socket

import torch

from kfac_callback.base import SingleProcess
from kfac_callback.ranks.process_group import ProcessGroupComm
from kfac_callback.ranks.process_group import flatten as _flatten
from kfac_callback.ranks.process_group import unflatten as _unflatten
from launcher.env import RankInfo
from trainer.ranks.host_address import reachable_address


class MPIComm:
    """mpi4py collectives on CPU tensors, through numpy views (no copies for one tensor)."""

    name = "mpi"

    def __init__(self, info: RankInfo) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank, self.world_size = self._comm.Get_rank(), self._comm.Get_size()
        if self.world_size != info.world_size:
            raise RuntimeError(
                f"the launcher started {info.world_size} ranks ({info.source}) but MPI sees a world of "
                f"{self.world_size}: the ranks did not join one job (with srun, pass --mpi=pmi2)")
        self.local_rank, self.local_size = info.local_rank, info.local_size

    def allreduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sums ``tensors`` over ranks in place, in one Allreduce."""
        if not tensors:
            return
        flat = _flatten(tensors).cpu()
        self._comm.Allreduce(self._mpi.IN_PLACE, flat.numpy(), op=self._mpi.SUM)
        _unflatten(flat, tensors)

    def broadcast_(self, tensors: list[torch.Tensor], src: int) -> None:
        """Copies ``tensors`` from rank ``src`` to every rank, in one Bcast."""
        if not tensors:
            return
        flat = _flatten(tensors).cpu()
        self._comm.Bcast(flat.numpy(), root=src)
        _unflatten(flat, tensors)

    def barrier(self) -> None:
        """Waits for every rank."""
        self._comm.Barrier()


class TorchDistComm(ProcessGroupComm):
    """torch.distributed collectives: gloo on CPUs, NCCL on GPUs (one device per local rank).

    Joins the process group if this process has none yet: under torchrun at the address it
    gives (``env://``), else where ``_rendezvous`` says.
    """

    def __init__(self, info: RankInfo, backend: str, multi_node: bool) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            if info.torchrun:
                dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size)
            else:
                addr, port = _rendezvous(info, multi_node)
                dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=info.rank,
                                        world_size=info.world_size)
            # Tear the group down before MPI finalizes (atexit runs last-registered first):
            # a gloo group still alive at interpreter exit aborts the process.
            atexit.register(self.close)
        super().__init__()
        self.name = backend
        self.local_rank, self.local_size = info.local_rank, info.local_size

    def close(self) -> None:
        """Destroys the process group (idempotent)."""
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def _rendezvous(info: RankInfo, multi_node: bool) -> tuple[str, int]:
    """Rank 0 picks an address and a free port and tells the others over MPI.

    MASTER_ADDR/MASTER_PORT in the environment win, for launchers that set them.
    """
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    from mpi4py import MPI

    choice = None
    if info.rank == 0:
        addr = reachable_address() if multi_node else "127.0.0.1"
        with socket.socket() as s:
            s.bind(("", 0))
            choice = (addr, s.getsockname()[1])
    return MPI.COMM_WORLD.bcast(choice, root=0)


def make_communicator(info: RankInfo, backend: str = "auto", device_type: str = "cpu",
                      multi_node: bool = False) -> object:
    """The communicator for this rank: single-process, mpi, gloo or nccl."""
    if info.world_size == 1:
        return SingleProcess()
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo" if info.torchrun else "mpi"
    if backend == "mpi" and info.torchrun:
        raise ValueError("trainer.backend=mpi: torchrun starts no MPI job; use trainer.backend=auto "
                         "(gloo on CPUs, nccl on GPUs) or gloo, or start the ranks with mpiexec or srun")
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("trainer.backend=nccl: NCCL needs GPUs (trainer.device=cuda or auto on a GPU node); "
                         "use trainer.backend=auto, mpi or gloo")
    if backend == "mpi":
        return MPIComm(info)
    return TorchDistComm(info, backend, multi_node)
