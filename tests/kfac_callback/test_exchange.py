"""The buffer layouts of the K-FAC callback and the collectives built on them, on thread ranks."""

from __future__ import annotations

import pytest
import torch

from kfac_callback.ranks import exchange
from kfac_callback.ranks.exchange import Layout, Slot
from tests.support.threads import run_ranks

D = torch.float64


def sym(n: int, seed: int) -> torch.Tensor:
    m = torch.randn(n, n + 2, dtype=D, generator=torch.Generator().manual_seed(seed))
    return (m @ m.T + (m @ m.T).T) / 2  # exactly symmetric


def test_layout_round_trip_symmetric_and_full() -> None:
    dims = [1, 2, 3, 4, 5, 8, 11]  # odd and even sizes take different layouts
    mats = [sym(n, n) for n in dims]
    extra = torch.arange(6, dtype=D).view(2, 3)
    layout = Layout([*(Slot((n, n), symmetric=True) for n in dims), Slot((2, 3))])
    flat = layout.pack([*mats, extra], D, "cpu")
    assert flat.numel() == layout.size == sum(n * (n + 1) // 2 for n in dims) + 6
    *got, got_extra = layout.unpack(flat)
    for g, want in zip(got, mats, strict=True):
        torch.testing.assert_close(g, want, rtol=0, atol=0)
    torch.testing.assert_close(got_extra, extra, rtol=0, atol=0)
    # The numbers on the wire are exactly one triangle of each matrix, no more.
    for n, m, start in zip(dims, mats, layout.offsets, strict=False):
        rows, cols = torch.triu_indices(n, n)
        sent = flat[start:start + n * (n + 1) // 2]
        torch.testing.assert_close(sent.sort().values, m[rows, cols].sort().values, rtol=0, atol=0)


def test_layout_is_linear_and_none_is_zeros() -> None:
    layout = Layout([Slot((4, 4), symmetric=True), Slot((3,))])
    a, b = sym(4, 1), sym(4, 2)
    v = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    summed = layout.pack([a, v], D, "cpu") + layout.pack([b, None], D, "cpu")
    torch.testing.assert_close(summed, layout.pack([a + b, v], D, "cpu"), rtol=0, atol=0)
    assert not layout.pack([None, None], D, "cpu").any()


def test_layout_refuses_mismatches() -> None:
    layout = Layout([Slot((2, 2))])
    with pytest.raises(ValueError, match="1 tensors for"):
        Layout([Slot((2,)), Slot((2,))]).pack([torch.zeros(2)], D, "cpu")
    with pytest.raises(ValueError, match="shape"):
        layout.pack([torch.zeros(3)], D, "cpu")
    with pytest.raises(ValueError, match="values for a layout"):
        layout.unpack(torch.zeros(5))


def test_sum_factors_sums_and_drops_a_layer_some_rank_lacks() -> None:
    shapes = [[(3, 3), (2, 2), (5,)], [(4, 4)]]  # (5,): a factor held as its diagonal (an embedding's A)

    def rank(comm):
        r = comm.rank
        first = [sym(3, 10 + r), sym(2, 20 + r), torch.arange(5, dtype=D) + r]
        second = [sym(4, 30 + r)] if r == 0 else None  # rank 1 saw no backward of layer 2
        return exchange.sum_factors(comm, [first, second], shapes, D, torch.device("cpu")), comm.calls

    for summed, calls in run_ranks(2, rank):
        assert calls == ["allreduce"]
        torch.testing.assert_close(summed[0][0], sym(3, 10) + sym(3, 11))
        torch.testing.assert_close(summed[0][1], sym(2, 20) + sym(2, 21))
        torch.testing.assert_close(summed[0][2], 2 * torch.arange(5, dtype=D) + 1)
        assert summed[1] is None


@pytest.mark.parametrize("counts", [[4, 4, 4], [3, 2, 0]])
def test_gather_rows_stacks_ranks_in_order(counts: list[int]) -> None:
    """Each rank's part is as long as its own share, an empty one included."""
    dims = [(3, 2), (2, 5)]

    def rows(r: int, layer: int):
        gen = torch.Generator().manual_seed(100 * r + layer)
        d_in, d_out = dims[layer]
        n = counts[r]
        return torch.randn(n, d_in, dtype=D, generator=gen), torch.randn(n, d_out, dtype=D, generator=gen)

    def rank(comm):
        mine = [rows(comm.rank, 0), rows(comm.rank, 1) if comm.rank != 2 else None]
        return exchange.gather_rows(comm, mine, counts, dims, D, torch.device("cpu"))

    for gathered in run_ranks(3, rank):
        a, g = gathered[0]
        assert a.shape == (sum(counts), 3)
        torch.testing.assert_close(a, torch.cat([rows(r, 0)[0] for r in range(3)]), rtol=0, atol=0)
        torch.testing.assert_close(g, torch.cat([rows(r, 0)[1] for r in range(3)]), rtol=0, atol=0)
        assert gathered[1] is None  # rank 2 could not offer it: nobody uses it


def test_gather_rows_needs_one_count_per_rank() -> None:
    with pytest.raises(ValueError, match="2 row counts for 3 ranks"):
        run_ranks(3, lambda comm: exchange.gather_rows(comm, [], [1, 1], [], D, torch.device("cpu")))


def test_broadcast_owned_copies_each_owners_tensors() -> None:
    def rank(comm):
        r = comm.rank
        zero = [torch.zeros(2, 3, dtype=D), torch.zeros(4)]
        from_0 = [torch.full((2, 3), 1.0, dtype=D), torch.full((4,), 2.0)] if r == 0 else zero
        from_1 = [torch.full((5,), -1.0, dtype=D) if r == 1 else torch.zeros(5, dtype=D)]
        owned = [from_0, from_1]
        exchange.broadcast_owned(comm, owned)
        return owned, comm.calls

    for owned, calls in run_ranks(2, rank):
        assert calls == ["broadcast0", "broadcast1"]
        assert (owned[0][0] == 1).all() and (owned[0][1] == 2).all() and owned[0][1].dtype == torch.float32
        assert (owned[1][0] == -1).all()


def test_gather_inverses_brings_every_owners_tensors_in_their_dtype() -> None:
    shapes = {"l0": [("A.chol", (2, 2)), ("A.inverse", (2, 2))], "l1": [("F.inverse", (3, 3))]}
    owners = {"l0": 0, "l1": 1}
    held = {"l0": {"A.chol": sym(2, 1), "pi": 1.5}, "l1": {"F.inverse": sym(3, 2).float(), "pi": 2.0}}

    def rank(comm):
        mine = {name: held[name] if owners[name] == comm.rank else {} for name in shapes}
        return exchange.gather_inverses(comm, mine, owners, shapes, torch.device("cpu"))

    for got in run_ranks(2, rank):
        assert set(got["l0"]) == {"A.chol", "pi"} and got["l0"]["pi"] == 1.5
        torch.testing.assert_close(got["l0"]["A.chol"], held["l0"]["A.chol"], rtol=0, atol=0)
        assert got["l1"]["F.inverse"].dtype == torch.float32
        torch.testing.assert_close(got["l1"]["F.inverse"], held["l1"]["F.inverse"], rtol=0, atol=0)
