"""Each rank's share of a step: the per-rank sample counts and the global batch N they give."""

from __future__ import annotations

from collections.abc import Sequence


def uneven(shares: Sequence[int] | None, world: int) -> tuple[int, ...] | None:
    """``shares`` as a tuple when they differ between ranks; ``None`` for equal shares,
    which take exactly the code path (and the numbers) of a call without shares.

    Raises:
        ValueError: Not one count >= 0 for each of the ``world`` ranks.
    """
    if shares is None:
        return None
    if len(shares) != world or any(n < 0 for n in shares):
        raise ValueError(f"K-FAC: shares {list(shares)}: need one count >= 0 for each of "
                         f"the {world} ranks")
    return None if len(set(shares)) == 1 else tuple(int(n) for n in shares)


def global_batch(local: int, shares: tuple[int, ...] | None, world: int) -> int:
    """N, the step's global batch: the sum of the shares, or ``local`` on every rank."""
    return local * world if shares is None else sum(shares)
