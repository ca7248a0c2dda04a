"""Damped inverses (Cholesky and eigen), the robustness ladder, and π."""

from __future__ import annotations

import math
import platform
import sys

import pytest
import torch

from kfac_callback.blocks.linalg import (
    DampedInverse,
    cholesky_lower_,
    damped_inverse,
    lapack_potrf,
    pi_factor,
)

D = torch.float64


def spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, rank or n + 2, dtype=D, generator=gen)
    return m @ m.T


@pytest.mark.parametrize("use_eigen", [False, True])
def test_damped_inverse_matches_dense_inverse(use_eigen: bool) -> None:
    mat = spd(5, 0, rank=2)  # singular without damping
    r = damped_inverse(mat, 0.3, D, use_eigen)
    assert r.note == ""
    torch.testing.assert_close(r.inverse, torch.linalg.inv(mat + 0.3 * torch.eye(5, dtype=D)))


def test_cholesky_and_eigen_paths_agree_with_diagonal_damping() -> None:
    mat = spd(6, 1)
    diag = torch.tensor([0.1, 0.1, 0.1, 2.0, 2.0, 2.0], dtype=D)
    chol = damped_inverse(mat, diag, D, use_eigen=False).inverse
    eig = damped_inverse(mat, diag, D, use_eigen=True).inverse
    torch.testing.assert_close(chol, eig)
    torch.testing.assert_close(chol, torch.linalg.inv(mat + torch.diag(diag)))


def test_float32_inverse_agrees_with_float64() -> None:
    mat = spd(8, 2)
    r32 = damped_inverse(mat.float(), 0.03, torch.float32)
    r64 = damped_inverse(mat, 0.03, D)
    assert r32.inverse.dtype == torch.float32
    torch.testing.assert_close(r32.inverse.double(), r64.inverse, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("use_eigen", [False, True])
def test_non_finite_factor_gives_no_inverse(bad: float, use_eigen: bool) -> None:
    mat = spd(4, 3)
    mat[1, 2] = bad
    r = damped_inverse(mat, 0.1, D, use_eigen)
    assert r.inverse is None
    assert "not finite" in r.note


@pytest.mark.parametrize("use_eigen", [False, True])
def test_indefinite_factor_rescued_by_more_damping(use_eigen: bool) -> None:
    # Smallest eigenvalue -0.5: damping 0.1 fails, 1.0 (×10) succeeds.
    mat = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=D))
    r = damped_inverse(mat, 0.1, D, use_eigen)
    assert "damping raised to 1" in r.note
    torch.testing.assert_close(r.inverse, torch.linalg.inv(mat + torch.eye(3, dtype=D)))


@pytest.mark.parametrize("use_eigen", [False, True])
def test_hopeless_factor_gives_no_inverse(use_eigen: bool) -> None:
    mat = -1e6 * torch.eye(3, dtype=D)
    r = damped_inverse(mat, 0.03, torch.float32, use_eigen)
    assert r.inverse is None
    assert "failed" in r.note


def test_float32_failure_is_retried_in_float64() -> None:
    # Eigenvalues 2 - 1e-10 and 1e-10: positive definite, but singular once rounded to float32.
    mat = torch.tensor([[1.0, 1.0 - 1e-10], [1.0 - 1e-10, 1.0]], dtype=D)
    r = damped_inverse(mat, 0.0, torch.float32)
    assert r.note == "decomposition failed; succeeded in float64"
    assert r.inverse.dtype == torch.float32
    torch.testing.assert_close(r.inverse.double(), torch.linalg.inv(mat), rtol=1e-5, atol=0)


def test_pi_formula() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=D))  # tr/dim = 2
    g = torch.diag(torch.tensor([0.5, 0.0], dtype=D))  # tr/dim = 0.25
    assert pi_factor(a, g) == pytest.approx(math.sqrt(2 / 0.25))
    assert pi_factor(a, torch.zeros(2, 2, dtype=D)) == 1.0


def test_damped_inverse_solves_on_both_sides_in_both_forms() -> None:
    """M⁻¹x and yM⁻¹ from a Cholesky factor and from an explicit inverse equal the dense solve."""
    m = spd(7, 11) + 0.1 * torch.eye(7, dtype=D)
    x, y = torch.randn(7, 3, dtype=D), torch.randn(2, 7, dtype=D)
    want_left, want_right = torch.linalg.solve(m, x), torch.linalg.solve(m, y.mT).mT
    for held in (DampedInverse(chol=torch.linalg.cholesky(m)), DampedInverse(inverse=torch.linalg.inv(m))):
        torch.testing.assert_close(held.solve(x), want_left)
        torch.testing.assert_close(held.solve_right(y), want_right)


def test_lapack_cholesky_is_found_on_linux_x86() -> None:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the in-place LAPACK Cholesky is checked where torch's CPU build links MKL")
    for dtype in (torch.float32, torch.float64):
        assert lapack_potrf(torch.eye(3, dtype=dtype)) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])  # transposed: torch's own Cholesky
def test_cholesky_in_place_gives_the_lower_factor_and_solves_like_a_clean_one(dtype, layout) -> None:
    m = (spd(9, 3) + 0.5 * torch.eye(9, dtype=D)).to(dtype)
    work = m.clone() if layout == "contiguous" else m.mT.contiguous().mT
    assert (lapack_potrf(work) is not None) == (layout == "contiguous" and sys.platform == "linux")
    chol = cholesky_lower_(work)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(chol.tril(), torch.linalg.cholesky(m), **tol)
    # Whatever the strict upper triangle holds, solves and the inverse read the lower one only.
    x, y = torch.randn(9, 4, dtype=dtype), torch.randn(3, 9, dtype=dtype)
    held = DampedInverse(chol=chol)
    want = DampedInverse(chol=torch.linalg.cholesky(m))
    torch.testing.assert_close(held.solve(x), want.solve(x), **tol)
    torch.testing.assert_close(held.solve_right(y), want.solve_right(y), **tol)
    torch.testing.assert_close(held.inverse, torch.linalg.inv(m), **tol)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cholesky_in_place_refuses_indefinite_matrices(layout) -> None:
    m = spd(6, 4) + 0.1 * torch.eye(6, dtype=D)
    m[4, 4] = -1.0
    work = m.clone() if layout == "contiguous" else m.mT.contiguous().mT
    assert cholesky_lower_(work) is None
    assert damped_inverse(m, 0.0, D).note  # the first rung failed, so the ladder says what it did
