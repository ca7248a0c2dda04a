"""kfac.factor_batch_size: the Kronecker factors of a subsample of the global batch.

A fully connected layer's factors cost N·(in² + out²) multiply-adds a step, its weight
gradient N·in·out: at a large batch N a factor-update step costs about as much again as the
gradient, while a few hundred samples already estimate the curvature well. So on
factor-update steps each rank feeds only the first m_r samples of its share into the factors
(shares are already shuffled), m_r proportional to its share n_r, the m_r adding up to
M = min(factor_batch_size, N); the formulas of §3 then use M in place of N (docs/algorithm.md
§3, "Subsampled factors"). The gradient and the batch route keep the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence


def subsample_shares(counts: Sequence[int], limit: int) -> tuple[int, ...] | None:
    """Per rank, how many of its first samples feed the factors; ``None``: all of them.

    ``None`` when ``limit`` is 0 (off) or not below the batch N = Σ counts, so that a large
    enough limit takes exactly the default path. Otherwise the largest-remainder split of M =
    ``limit`` in proportion to ``counts``: m_r = ⌊M·n_r/N⌋, the remaining samples one each to
    the ranks with the largest fractions, ties to the lower rank. Deterministic and the same on
    every rank; m_r ≤ n_r always (100 over [13]*4 + [12]*4 with M = 50: 7, 7, 6, 6, 6, 6, 6, 6).
    """
    total = sum(counts)
    if limit <= 0 or limit >= total:
        return None
    floors = [limit * n // total for n in counts]
    rest = limit - sum(floors)
    by_fraction = sorted(range(len(counts)), key=lambda r: (-(limit * counts[r] % total), r))
    for r in by_fraction[:rest]:
        floors[r] += 1
    return tuple(floors)


def factor_batch(limit: int, n_local: int, world: int, rank: int,
                 shares: Sequence[int] | None) -> tuple[int | None, int | None]:
    """``(M, m_r)`` for this rank's factor contributions, or ``(None, None)`` for the whole batch.

    ``shares``: the step's per-rank counts, ``None`` for every rank ``n_local`` (the callback's
    convention for equal shares).
    """
    counts = [n_local] * world if shares is None else list(shares)
    split = subsample_shares(counts, limit)
    if split is None:
        return None, None
    return sum(split), split[rank]
