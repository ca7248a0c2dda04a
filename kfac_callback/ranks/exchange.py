"""Every buffer the K-FAC callback sends: its layout, and the collectives that move it.

One ``Layout`` places a list of tensors in one flat buffer (a symmetric matrix as its
n(n+1)/2 independent numbers) and takes them out again; every collective of the callback is
one ``Layout`` packed, moved in ONE call of the communicator, and unpacked
(docs/algorithm.md §6). The layouts are linear, so the sum over ranks of packed buffers is the
packed sum. Every rank builds the same layout from the same layer list, so buffers line up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kfac_callback.base import Communicator


@dataclass(frozen=True)
class Slot:
    """One tensor's place in a buffer: its shape, and whether it is a symmetric matrix."""

    shape: tuple[int, ...]
    symmetric: bool = False

    @property
    def size(self) -> int:
        """How many numbers it takes in the buffer."""
        if self.symmetric:
            n = self.shape[0]
            return n * (n + 1) // 2
        return math.prod(self.shape)


class Layout:
    """Tensors of fixed shapes, one after another in one flat buffer.

    Args:
        slots: The tensors' places, in order.
    """

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = list(slots)
        self.offsets = []
        offset = 0
        for slot in self.slots:
            self.offsets.append(offset)
            offset += slot.size
        self.size = offset

    def pack(self, tensors: Sequence[torch.Tensor | None], dtype: torch.dtype,
             device: torch.device | str) -> torch.Tensor:
        """A new buffer holding ``tensors`` in their slots (``None``: zeros), cast to ``dtype``."""
        if len(tensors) != len(self.slots):
            raise ValueError(f"Layout.pack: {len(tensors)} tensors for {len(self.slots)} slots")
        flat = torch.zeros(self.size, dtype=dtype, device=device)
        for slot, start, t in zip(self.slots, self.offsets, tensors, strict=True):
            if t is None:
                continue
            if tuple(t.shape) != slot.shape:
                raise ValueError(f"Layout.pack: a tensor of shape {tuple(t.shape)} for a slot of {slot.shape}")
            part = flat[start:start + slot.size]
            if slot.symmetric:
                part.copy_(_pack_symmetric(t.to(dtype)))
            else:
                part.view(slot.shape).copy_(t)
        return flat

    def unpack(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The tensors of ``pack``: views of ``flat``, new tensors for symmetric slots."""
        if flat.numel() != self.size:
            raise ValueError(f"Layout.unpack: {flat.numel()} values for a layout of {self.size}")
        out = []
        for slot, start in zip(self.slots, self.offsets, strict=True):
            part = flat[start:start + slot.size]
            out.append(_unpack_symmetric(part, slot.shape[0]) if slot.symmetric else part.view(slot.shape))
        return out


def widest_dtype(tensors: Sequence[torch.Tensor], start: torch.dtype | None = None) -> torch.dtype:
    """The dtype that holds every tensor's values exactly (at least ``start``)."""
    dtype = start or tensors[0].dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def sum_factors(comm: Communicator, contributions: Sequence[Sequence[torch.Tensor] | None],
                shapes: Sequence[Sequence[tuple[int, ...]]], dtype: torch.dtype,
                device: torch.device) -> list[list[torch.Tensor] | None]:
    """Sums each layer's factor contributions over ranks, all layers in one collective.

    Args:
        contributions: Per layer, its symmetric factor contributions, or ``None`` where this
            rank has none this step.
        shapes: Per layer, the shapes of its factors (a square matrix, or a diagonal's vector).

    Returns:
        Per layer, the summed factors, or ``None`` where some rank had no contribution.
    """
    slots = [Slot(tuple(s), symmetric=len(s) == 2) for layer in shapes for s in layer]
    layout = Layout([*slots, Slot((len(shapes),))])
    flat_mats = [m for layer, d in zip(contributions, shapes, strict=True)
                 for m in (layer if layer is not None else [None] * len(d))]
    present = torch.tensor([float(c is not None) for c in contributions])
    flat = layout.pack([*flat_mats, present], dtype, device)
    comm.allreduce_sum_([flat])
    *mats, counts = layout.unpack(flat)
    out, i = [], 0
    for layer, count in zip(shapes, counts.tolist(), strict=True):
        out.append(mats[i:i + len(layer)] if round(count) == comm.world_size else None)
        i += len(layer)
    return out


def gather_rows(comm: Communicator, rows: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                counts: Sequence[int], dims: Sequence[tuple[int, int]], dtype: torch.dtype,
                device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Gathers every rank's ``(a, g)`` rows of each layer, all layers in one collective.

    Each rank writes its rows into its own part of a zeroed buffer, so the sum is the gathered
    batch; a flag per layer counts the ranks that offered it. Each rank's part is as long as
    its own share (``counts``), so uneven shares need no padding (docs/algorithm.md §6).

    Args:
        rows: Per layer, this rank's ``(a, g)`` of ``counts[comm.rank]`` rows each, or ``None``.
        counts: Per rank, how many rows it holds (the same list on every rank; 0 is fine).
        dims: Per layer, ``(d_in, d_out)``: the widths of ``a`` and ``g``.

    Returns:
        Per layer, ``(a, g)`` with every rank's rows in rank order, or ``None`` where some
        rank offered none.
    """
    world = comm.world_size
    if len(counts) != world:
        raise ValueError(f"gather_rows: {len(counts)} row counts for {world} ranks")
    per_rank = [[Slot((n, d)) for d_in, d_out in dims for d in (d_in, d_out)] for n in counts]
    width = 2 * len(dims)  # slots per rank: a and g of every layer
    layout = Layout([*(slot for part in per_rank for slot in part), Slot((len(dims),))])
    mine = [t for pair in rows for t in (pair if pair is not None else (None, None))]
    parts = [None] * (width * world)
    parts[comm.rank * width:(comm.rank + 1) * width] = mine
    present = torch.tensor([float(pair is not None) for pair in rows])
    flat = layout.pack([*parts, present], dtype, device)
    comm.allreduce_sum_([flat])
    *tensors, counted = layout.unpack(flat)
    out = []
    for i, count in enumerate(counted.tolist()):
        if round(count) != world:
            out.append(None)
            continue
        a = torch.cat([tensors[r * width + 2 * i] for r in range(world)])
        g = torch.cat([tensors[r * width + 2 * i + 1] for r in range(world)])
        out.append((a, g))
    return out


def broadcast_owned(comm: Communicator, owned: Sequence[Sequence[torch.Tensor]]) -> None:
    """Copies each owner's tensors to every rank, in place: one broadcast per owner with any.

    Args:
        owned: Per rank, the tensors it owns (the same shapes listed on every rank).
    """
    for owner, tensors in enumerate(owned):
        if not tensors:
            continue
        layout = Layout([Slot(tuple(t.shape)) for t in tensors])
        mine = comm.rank == owner
        flat = layout.pack(tensors if mine else [None] * len(tensors), widest_dtype(tensors), tensors[0].device)
        comm.broadcast_([flat], owner)
        if not mine:
            for t, got in zip(tensors, layout.unpack(flat), strict=True):
                t.copy_(got)


def _pack_symmetric(mat: torch.Tensor) -> torch.Tensor:
    """The n(n+1)/2 independent numbers of a symmetric matrix.

    The rectangular full packed (RFP) layout of LAPACK: split the matrix at m = ceil(n/2) into
    a leading block P (m×m), a trailing block Q (k×k, k = n - m) and the off-diagonal block
    R (k×m). The lower triangle of P and the upper triangle of Q interlock into one rectangle T
    (n even: (m+1)×m, P's triangle one row down; n odd: m×m, Q's triangle one column right),
    so T and R hold exactly n(n+1)/2 numbers and both are cut out of the matrix by slicing:
    dense passes instead of a gather by index.
    """
    n = mat.shape[0]
    m = n - n // 2
    k = n - m
    if n % 2 == 0:
        rect = mat.new_zeros(m + 1, m)
        rect[1:] = mat[:m, :m].tril()
        rect[:m] += mat[m:, m:].triu()
    else:
        rect = mat[:m, :m].tril()
        rect[:k, 1:] += mat[m:, m:].triu()
    return torch.cat([rect.reshape(-1), mat[m:, :m].reshape(-1)])


def _unpack_symmetric(values: torch.Tensor, n: int) -> torch.Tensor:
    """The symmetric n×n matrix whose ``_pack_symmetric`` is ``values``."""
    m = n - n // 2
    k = n - m
    rows = m + 1 if n % 2 == 0 else m
    rect = values[:rows * m].view(rows, m)
    out = values.new_empty(n, n)
    lead, trail = out[:m, :m], out[m:, m:]
    if n % 2 == 0:
        lead.copy_(rect[1:].tril())
        trail.copy_(rect[:m].triu())
    else:
        lead.copy_(rect.tril())
        trail.copy_(rect[:k, 1:].triu())
    lead += lead.tril(-1).mT  # mirror each triangle into its empty half
    trail += trail.triu(1).mT
    off = values[rows * m:].view(k, m)
    out[m:, :m] = off
    out[:m, m:] = off.mT
    return out


_DTYPE_CODES = {torch.float32: 1, torch.float64: 2}


def gather_inverses(comm: Communicator, inverses: dict[str, dict[str, torch.Tensor | float]],
                    owners: dict[str, int], shapes: dict[str, list[tuple[str, int]]],
                    device: torch.device) -> dict[str, dict[str, torch.Tensor | float]]:
    """Every layer's inverse state on every rank, from its owner (a checkpoint's view).

    First one sum says what each owner holds (a dtype code per tensor, and π); then one
    broadcast per owner carries its tensors in float64, which holds float32 values exactly.

    Args:
        inverses: Per layer, ``Block.export_inverses()`` on its owner, ``{}`` elsewhere.
        shapes: Per layer, ``(key, shape)`` of every tensor it may hold.
    """
    keys = [(name, key, tuple(shape)) for name, layer in shapes.items() for key, shape in layer]
    names = list(shapes)
    header = torch.zeros(len(keys) + len(names), dtype=torch.float64, device=device)
    for i, (name, key, _) in enumerate(keys):
        if key in inverses[name]:
            header[i] = _DTYPE_CODES[inverses[name][key].dtype]
    for j, name in enumerate(names):
        header[len(keys) + j] = float(inverses[name].get("pi", 0.0))
    comm.allreduce_sum_([header])
    held = header.tolist()
    dtypes = {code: dtype for dtype, code in _DTYPE_CODES.items()}
    gathered: dict[str, dict[str, torch.Tensor | float]] = {name: {} for name in names}
    for owner in range(comm.world_size):
        mine = [(i, name, key, n) for i, (name, key, n) in enumerate(keys) if owners[name] == owner and held[i]]
        if not mine:
            continue
        layout = Layout([Slot(shape) for *_, shape in mine])
        tensors = [inverses[name][key] if comm.rank == owner else None for _, name, key, _ in mine]
        flat = layout.pack(tensors, torch.float64, device)
        comm.broadcast_([flat], owner)
        for (i, name, key, _), t in zip(mine, layout.unpack(flat), strict=True):
            gathered[name][key] = t.to(dtypes[round(held[i])]).clone()
    for j, name in enumerate(names):
        if gathered[name]:
            gathered[name]["pi"] = held[len(keys) + j]
    return gathered
