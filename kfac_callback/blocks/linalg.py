"""Dense linear algebra of K-FAC: damped inverses and π.

Everything here is a pure function of tensors. The robustness ladder of docs/algorithm.md §5 lives in
``damped_inverse``: a failure never produces a tensor, only ``None`` and a note, so that
nothing non-finite can reach the weights.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

Damping = float | torch.Tensor

# How often and by how much the damping grows before a layer gives up (docs/algorithm.md §5).
DAMPING_RETRIES = 3
DAMPING_GROWTH = 10.0


@dataclass
class InverseResult:
    """The outcome of ``damped_inverse``.

    Attributes:
        inverse: The inverse in the requested dtype, or ``None`` if every attempt failed.
        note: Empty when the first attempt succeeded, else what the ladder had to do.
    """

    inverse: torch.Tensor | None
    note: str = ""


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite.

    The sum is one cheap pass that any NaN or Inf poisons; only when it is not finite (or
    overflowed) does the exact element-wise test run.
    """
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def add_damping(mat: torch.Tensor, damping: Damping) -> torch.Tensor:
    """Returns ``mat + diag(damping)`` (a scalar damping is ``damping·I``) as a new tensor."""
    out = mat.clone()
    diag = out.diagonal()
    if isinstance(damping, torch.Tensor):
        diag.add_(damping.to(device=out.device, dtype=out.dtype))
    else:
        diag.add_(damping)
    return out


_POTRF: dict[torch.dtype, Callable[[torch.Tensor], int] | None] = {}


def _load_potrf(dtype: torch.dtype) -> Callable[[torch.Tensor], int] | None:
    """``?potrf`` of the LAPACK linked into torch's CPU library, checked once on a small matrix.

    Integers go in as 64-bit and come back read from their low half, which is right for both
    LAPACK integer widths (LP64, ILP64) on a little-endian machine; elsewhere, or where the
    library has no such symbol or the check fails, ``None`` (torch's own Cholesky is used).
    """
    if sys.byteorder != "little":
        return None
    name = {torch.float32: "spotrf_", torch.float64: "dpotrf_"}[dtype]
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib",
                                       "libtorch_cpu" + (".dylib" if sys.platform == "darwin" else ".so")))
        fn = getattr(lib, name)
    except (OSError, AttributeError):
        return None

    def potrf(m: torch.Tensor) -> int:
        # Row-major m read as column-major is mᵀ = m; 'L' leaves L in the column-major lower
        # triangle, i.e. L = m.mT. The trailing 1 is the Fortran length of the 'L' argument.
        n = ctypes.c_int64(m.shape[0])
        info = ctypes.c_int64(0)
        fn(ctypes.c_char_p(b"L"), ctypes.byref(n), ctypes.c_void_p(m.data_ptr()), ctypes.byref(n),
           ctypes.byref(info), ctypes.c_size_t(1))
        return ctypes.c_int32(info.value & 0xFFFFFFFF).value

    probe = torch.tensor([[4.0, 2.0, 0.4], [2.0, 5.0, 1.0], [0.4, 1.0, 3.0]], dtype=dtype)
    expected = torch.linalg.cholesky(probe)
    try:
        info = potrf(probe)
    except Exception:  # noqa: BLE001 (a foreign call that fails in any way means: do not use it)
        return None
    if info != 0 or not torch.allclose(probe.mT.tril(), expected):
        return None
    return potrf


def lapack_potrf(m: torch.Tensor) -> Callable[[torch.Tensor], int] | None:
    """The in-place LAPACK Cholesky for ``m`` (CPU, float32/64, contiguous), or ``None``."""
    if m.device.type != "cpu" or m.dtype not in (torch.float32, torch.float64) or not m.is_contiguous():
        return None
    if m.dtype not in _POTRF:
        _POTRF[m.dtype] = _load_potrf(m.dtype)
    return _POTRF[m.dtype]


def cholesky_lower_(m: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor L of the symmetric positive definite ``m``, overwriting ``m``.

    Returns L (a column-major view of ``m``'s storage) or ``None`` when ``m`` is not positive
    definite. Only L's lower triangle is meaningful: its strict upper triangle keeps some of
    ``m``'s entries, and every consumer (triangular solves, ``cholesky_inverse``) reads the
    lower triangle only. Factoring in place through LAPACK (``lapack_potrf``) saves the two
    copies and the zeroing of ``torch.linalg.cholesky_ex`` (~12% of a 1000×1000 factorisation).

    ``m`` must be finite (``damped_inverse`` checks): then L is finite exactly when the
    factorisation succeeds and L's diagonal is finite. LAPACK stops at a pivot that is not
    positive; a NaN or Inf anywhere in row j of L would reach that row's pivot and the diagonal
    (O(n), instead of a pass over all n² entries).
    """
    potrf = lapack_potrf(m)
    if potrf is None:
        chol, info = torch.linalg.cholesky_ex(m)
        ok = int(info) == 0
    else:
        chol, ok = m.mT, potrf(m) == 0
    if not ok or not bool(torch.isfinite(chol.diagonal()).all()):
        return None
    return chol


def _inverse_once(mat: torch.Tensor, damping: Damping, dtype: torch.dtype,
                  use_eigen: bool, cholesky_only: bool = False) -> torch.Tensor | None:
    """One attempt: damp, decompose, invert in ``dtype``; ``None`` on any failure.

    With ``cholesky_only`` the lower Cholesky factor L is returned instead of the inverse
    (see ``cholesky_lower_``): solving with L costs less than forming the inverse (see
    ``DampedInverse``).
    """
    m = add_damping(mat.to(dtype), damping)  # a fresh copy: the factorisation may overwrite it
    if use_eigen:
        try:
            evals, evecs = torch.linalg.eigh(m)
        except RuntimeError:  # eigh's iteration did not converge
            return None
        # A damped factor must be positive definite; an indefinite "inverse" would flip
        # gradient directions.
        if not bool((evals > 0).all()):
            return None
        inv = (evecs / evals) @ evecs.mT
    else:
        chol = cholesky_lower_(m)
        if chol is None or cholesky_only:
            return chol
        # LAPACK potri: several times faster on CPU than forming L⁻¹ by a triangular solve.
        inv = torch.cholesky_inverse(chol)
    if not all_finite(inv):
        return None
    return inv


def _grow(damping: Damping, mat: torch.Tensor) -> Damping:
    """Damping for the next rung: ×10, or a small multiple of the diagonal when it is 0."""
    if isinstance(damping, torch.Tensor):
        if bool((damping > 0).any()):
            return damping * DAMPING_GROWTH
        scale = float(mat.diagonal().abs().mean()) or 1.0
        return torch.full_like(damping, 1e-6 * scale)
    if damping > 0:
        return damping * DAMPING_GROWTH
    return 1e-6 * (float(mat.diagonal().abs().mean()) or 1.0)


def _describe(damping: Damping) -> str:
    if isinstance(damping, torch.Tensor):
        return f"{float(damping.max()):g} (largest)"
    return f"{damping:g}"


def damped_inverse(mat: torch.Tensor, damping: Damping, dtype: torch.dtype = torch.float32,
                   use_eigen: bool = False, cholesky_only: bool = False) -> InverseResult:
    """Inverse of ``mat + diag(damping)`` with the robustness ladder of docs/algorithm.md §5.

    Tries ``dtype``; on a failed decomposition or a non-finite result retries in float64,
    then in float64 with the damping grown ×10 up to ``DAMPING_RETRIES`` times.

    Args:
        mat: A symmetric positive semi-definite factor (n×n).
        damping: A scalar (``damping·I``) or a length-n vector (``diag(damping)``).
        dtype: The dtype of the decomposition and of the returned inverse.
        use_eigen: Use ``eigh`` instead of Cholesky (same damping, same result up to rounding).
        cholesky_only: Return the lower Cholesky factor of the damped matrix, not its inverse
            (ignored with ``use_eigen``).

    Returns:
        The inverse (``None`` if every rung failed or ``mat`` is not finite) and a note.
    """
    if not all_finite(mat):
        return InverseResult(None, "factor is not finite")
    inv = _inverse_once(mat, damping, dtype, use_eigen, cholesky_only)
    if inv is not None:
        return InverseResult(inv)
    if dtype != torch.float64:
        inv = _inverse_once(mat, damping, torch.float64, use_eigen, cholesky_only)
        if inv is not None:
            return InverseResult(inv.to(dtype), "decomposition failed; succeeded in float64")
    grown = damping
    for _ in range(DAMPING_RETRIES):
        grown = _grow(grown, mat)
        inv = _inverse_once(mat, grown, torch.float64, use_eigen, cholesky_only)
        if inv is not None:
            return InverseResult(inv.to(dtype), "decomposition failed; succeeded in float64 "
                                 f"with damping raised to {_describe(grown)}")
    return InverseResult(None, "decomposition failed even in float64 with damping raised to "
                         f"{_describe(grown)}")


class DampedInverse:
    """M⁻¹ of a damped factor, held as its Cholesky factor L (M = L Lᵀ) or as M⁻¹ itself.

    Preconditioning needs only products M⁻¹X. With L they are two triangular solves, which
    cost as much as one product with an explicit inverse, so forming M⁻¹ (a further
    ~n³ flops per factor at every compute step) is skipped.
    """

    def __init__(self, chol: torch.Tensor | None = None, inverse: torch.Tensor | None = None) -> None:
        self.chol = chol
        self._inverse = inverse

    @property
    def dtype(self) -> torch.dtype:
        return (self.chol if self.chol is not None else self._inverse).dtype

    @property
    def inverse(self) -> torch.Tensor:
        """The explicit inverse (formed on first use when only L is held)."""
        if self._inverse is None:
            self._inverse = torch.cholesky_inverse(self.chol)
        return self._inverse

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """M⁻¹ x for a matrix x with M's number of rows."""
        if self.chol is not None:
            # Two triangular solves: ~10% faster here than cholesky_solve, which first copies
            # the factor into a new column-major buffer on every call.
            y = torch.linalg.solve_triangular(self.chol, x, upper=False)
            return torch.linalg.solve_triangular(self.chol.mT, y, upper=True)
        return self._inverse @ x

    def solve_right(self, y: torch.Tensor) -> torch.Tensor:
        """y M⁻¹ for a matrix y with M's number of columns (M⁻¹ is symmetric)."""
        if self.chol is not None:
            return self.solve(y.mT).mT
        # y @ M⁻¹ row by row: ~8x faster on CPU than (M⁻¹ yᵀ)ᵀ when y has few rows
        # (the MLP's 10-wide output layer), where the transposed skinny operand hits a slow path.
        return y @ self._inverse


def pi_factor(a: torch.Tensor, g: torch.Tensor) -> float:
    """π of docs/algorithm.md §4: ``sqrt((tr A / dim A) / (tr G / dim G))``.

    Returns 1 when a trace is not positive and finite, since π only rebalances damping
    between the two factors and must not make it non-finite.
    """
    return _pi(float(a.diagonal().sum()) / a.shape[0], float(g.diagonal().sum()) / g.shape[0])


def pi_factor_diagonal(a: torch.Tensor, g: torch.Tensor) -> float:
    """``pi_factor`` for an A held as its diagonal (a vector)."""
    return _pi(float(a.mean()), float(g.diagonal().sum()) / g.shape[0])


def _pi(ta: float, tg: float) -> float:
    if not (math.isfinite(ta) and math.isfinite(tg)) or ta <= 0 or tg <= 0:
        return 1.0
    return math.sqrt(ta / tg)
