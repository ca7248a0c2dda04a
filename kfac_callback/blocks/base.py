"""The block base class: the bookkeeping every layer type shares (docs/algorithm.md §3-§5).

Convention (docs/algorithm.md §3): each rank's loss is a mean over its LOCAL mini-batch of
``n`` samples; the ranks' shares may differ (by a sample, or a rank may hold none), and the
global batch ``N`` is their sum (``n·R`` for equal shares). A captured ``grad_output`` is the
gradient of the local mean loss, so the per-sample gradient is ``n·grad_output_i`` and the
global ``e_i = grad_output_i·n/N``. Each rank's contribution uses its own ``n`` (the rows it
captured) and the global ``N``; the sum of the contributions over ranks is the factor of the
global batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from kfac_callback.blocks.linalg import all_finite


class Dampings(NamedTuple):
    """The four current damping values (docs/algorithm.md §4)."""

    act: float
    err: float
    bn_act: float
    bn_err: float


class Block:
    """Base class: one preconditioned layer's factors, inverses and gradient transform.

    Attributes:
        name: The layer's name in ``model.named_modules()``.
        module: The layer.
        kind: The layer type, as the setup lines print it (``"linear"``, ``"conv2d"``, ...).
        updates: How many times the running averages were updated.
    """

    kind = ""
    factor_names: tuple[str, ...] = ()

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.updates = 0
        self.inverse_notes: list[str] = []

    # -- factors ---------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype: float64 for a float64 layer, else float32, whatever the forward's
        dtype (bf16 or fp16 weights or autocast: factors are accumulated and inverted in float32,
        docs/algorithm.md §3)."""
        return torch.float64 if self.module.weight.dtype == torch.float64 else torch.float32

    def factor_dims(self) -> list[int]:
        """Sizes of the square factors, in ``factor_names`` order."""
        raise NotImplementedError

    def factor_shapes(self) -> list[tuple[int, ...]]:
        """The factors' shapes, in ``factor_names`` order: ``(n, n)``, or ``(n,)`` for a factor
        held as its diagonal."""
        return [(n, n) for n in self.factor_dims()]

    def gram_terms(self, a: torch.Tensor, g: torch.Tensor, n_global: int,
                   n_local: int | None = None, keep: int | None = None) -> list[tuple[torch.Tensor, float]]:
        """Each factor's contribution as rows X and a scale c, the factor being ``c·XᵀX``.

        In ``factor_names`` order. Keeping the product unformed lets one rank fold it straight
        into the running average with a single GEMM (``accumulate``).

        Args:
            a: The layer's input, batch first.
            g: The gradient of the local mean loss with respect to the layer's output.
            n_global: N, the global mini-batch size: the sum of every rank's local batch.
            n_local: n, this rank's samples of the step (``None``: the rows of ``a``); with
                micro-batches ``a`` holds one of them and n counts them all.
            keep: Only the first ``keep`` samples contribute (``None``: all): a subsample for
                the factors, ``n_global`` then its global size M (docs/algorithm.md §3,
                "Subsampled factors"); per-sample quantities that depend on the whole batch
                (BatchNorm's x̂) still use every row.
        """
        raise NotImplementedError

    def step_terms(self, a: torch.Tensor | Sequence[torch.Tensor], g: torch.Tensor | Sequence[torch.Tensor],
                   n_global: int, keep: int | None = None) -> list[tuple[torch.Tensor, float]]:
        """``gram_terms`` of one batch, or of a step's micro-batches (lists of ``a`` and ``g``).

        Micro-batches (docs/algorithm.md §3): g of each is the gradient of the rank's mean loss
        over all its n samples (each micro-batch's loss weighted by its share of them), so
        every micro-batch uses the rank's whole n; their rows are joined, one X per factor.
        (A convolution's scale depends on the positions; rows of a micro-batch whose scale
        differs are rescaled by the square root of the ratio.) ``keep``: the rank's first
        ``keep`` samples over its micro-batches in order (``gram_terms``).
        """
        if isinstance(a, torch.Tensor):
            return self.gram_terms(a, g, n_global, None, keep)
        n_local = sum(x.shape[0] for x in a)
        left = n_local if keep is None else keep
        per = []
        for x, y in zip(a, g, strict=True):
            take = min(left, x.shape[0])
            left -= take
            per.append(self.gram_terms(x, y, n_global, n_local, None if keep is None else take))
        if len(per) == 1:
            return per[0]
        joined = []
        for f in range(len(self.factor_names)):
            terms = [p[f] for p in per]
            c = max(t[1] for t in terms)
            rows = [x if cx == c or c == 0 else x * math.sqrt(cx / c) for x, cx in terms]
            joined.append((torch.cat(rows), c))
        return joined

    def contributions(self, a: torch.Tensor | Sequence[torch.Tensor], g: torch.Tensor | Sequence[torch.Tensor],
                      n_global: int, keep: int | None = None) -> list[torch.Tensor]:
        """This rank's factor contributions ``c·XᵀX``, in ``factor_names`` order (see ``gram_terms``;
        ``a`` and ``g`` may be lists, one entry per micro-batch: ``step_terms``)."""
        return [(x.mT @ x).mul_(c) for x, c in self.step_terms(a, g, n_global, keep)]

    def accumulate(self, a: torch.Tensor | Sequence[torch.Tensor], g: torch.Tensor | Sequence[torch.Tensor],
                   n_global: int, decay: float, keep: int | None = None) -> bool:
        """Folds this batch's factors into the running averages in one GEMM each (one rank).

        Same result as ``update_factors(contributions(...))`` without forming the batch
        factors: ``old ← decay·old + (1-decay)·c·XᵀX`` is one ``addmm_``. Every entry of
        ``c·XᵀX`` is bounded by ``c·‖X‖²`` (Cauchy–Schwarz), so that one number being finite
        proves the new factor finite before anything is touched.

        Returns:
            ``False`` (and nothing changes) if a new factor would not be finite.
        """
        terms = [(x.to(self.dtype), c) for x, c in self.step_terms(a, g, n_global, keep)]
        if not all(bool(torch.isfinite(x.square().sum() * c)) for x, c in terms):
            return False
        for name, (x, c) in zip(self.factor_names, terms, strict=True):
            old = getattr(self, name)
            if old is None or self.updates == 0:
                setattr(self, name, (x.mT @ x).mul_(c))
            else:
                old.addmm_(x.mT, x, beta=decay, alpha=(1.0 - decay) * c)
        self.updates += 1
        return True

    def factors(self) -> list[torch.Tensor | None]:
        """The running-average factors, in ``factor_names`` order (``None`` before the first)."""
        return [getattr(self, n) for n in self.factor_names]

    def set_factors(self, mats: list[torch.Tensor | None]) -> None:
        """Replaces the running-average factors (used by ``load_state_dict``)."""
        for n, m in zip(self.factor_names, mats, strict=True):
            setattr(self, n, None if m is None else m.to(self.module.weight.device, self.dtype))

    def update_factors(self, mats: list[torch.Tensor], decay: float) -> bool:
        """Folds new factors into the running averages (docs/algorithm.md §3).

        The first update takes the factors as they are; later ones compute
        ``decay·old + (1-decay)·new``.

        Returns:
            ``False`` (and nothing changes) if a new factor is not finite.
        """
        if not all(all_finite(m) for m in mats):
            return False
        for n, m in zip(self.factor_names, mats, strict=True):
            old = getattr(self, n)
            if old is None or self.updates == 0:
                setattr(self, n, m.to(self.dtype).clone())
            else:
                old.mul_(decay).add_(m.to(self.dtype), alpha=1.0 - decay)
        self.updates += 1
        return True

    @property
    def has_factors(self) -> bool:
        """Whether every running average exists."""
        return all(m is not None for m in self.factors())

    # -- inverses --------------------------------------------------------------------

    def inverse_dtype(self, requested: torch.dtype) -> torch.dtype:
        """float64 layers keep float64 inverses; others use the requested dtype."""
        return torch.float64 if self.dtype == torch.float64 else requested

    def compute_inverses(self, damping: Dampings, use_pi: bool = False, use_eigen: bool = False,
                         dtype: torch.dtype = torch.float32, explicit: bool = False) -> bool:
        """Computes the damped inverses; on failure drops them so the plain gradient is used.

        Args:
            explicit: Form explicit inverses (worth it when they serve many steps); else
                Kronecker blocks keep Cholesky factors and solve with them.

        Returns:
            Whether every inverse exists now. ``inverse_notes`` says what the robustness
            ladder had to do.
        """
        self.clear_inverses()
        self.inverse_notes = []
        if not self.has_factors:
            return False
        return self._invert(damping, use_pi, use_eigen, self.inverse_dtype(dtype), explicit)

    def _invert(self, damping: Dampings, use_pi: bool, use_eigen: bool, dtype: torch.dtype,
                explicit: bool) -> bool:
        """The math of ``compute_inverses``, on factors that exist, into ``dtype``."""
        raise NotImplementedError

    def clear_inverses(self) -> None:
        """Forgets the inverses (they are rebuilt at the next compute step)."""
        raise NotImplementedError

    @property
    def has_inverses(self) -> bool:
        """Whether the layer can be preconditioned now."""
        raise NotImplementedError

    def export_inverses(self) -> dict[str, torch.Tensor | float]:
        """The layer's inverse state for a checkpoint; empty when it has no inverses.

        Keys: ``"<factor>.chol"`` and ``"<factor>.inverse"`` for the tensors held, and ``"pi"``.
        """
        raise NotImplementedError

    def import_inverses(self, state: dict[str, torch.Tensor | float]) -> None:
        """Restores ``export_inverses()`` exactly (an empty dict clears the inverses)."""
        raise NotImplementedError

    # -- gradients -------------------------------------------------------------------

    def parameters(self) -> list[torch.Tensor]:
        """The layer's preconditioned parameters (weight, then bias if any)."""
        return [p for p in (self.module.weight, getattr(self.module, "bias", None))
                if p is not None]

    def grads(self) -> list[torch.Tensor] | None:
        """The parameters' gradients, or ``None`` if any is missing."""
        grads = [p.grad for p in self.parameters()]
        return None if any(g is None for g in grads) else grads

    def grads_finite(self) -> bool:
        """Whether every gradient of the layer is finite (missing gradients count as finite)."""
        grads = self.grads()
        return grads is None or all(all_finite(g) for g in grads)

    def zero_grads(self) -> None:
        """Sets the gradients to zero, so a non-finite gradient cannot reach the weights."""
        for p in self.parameters():
            if p.grad is not None:
                p.grad.zero_()

    def precondition(self, lr_factor: float = 1.0) -> bool:
        """Replaces the gradients by the preconditioned gradients (docs/algorithm.md §5).

        Returns:
            ``False`` (gradients untouched) when there are no inverses, no gradients, or the
            result is not finite.
        """
        grads = self.grads()
        if grads is None or not self.has_inverses:
            return False
        done = self._precondition_in_place(grads, lr_factor)
        if done is not None:
            return done
        new = self._preconditioned(grads, lr_factor)
        if not all(all_finite(t) for t in new):
            return False
        for g, t in zip(grads, new, strict=True):
            g.copy_(t)
        return True

    def _preconditioned(self, grads: list[torch.Tensor], lr_factor: float) -> list[torch.Tensor]:
        raise NotImplementedError

    def _precondition_in_place(self, grads: list[torch.Tensor], lr_factor: float) -> bool | None:
        """A faster path that writes the result straight into the gradients, where one exists.

        Returns:
            ``None`` when it does not apply (``precondition`` then takes the general path),
            else what ``precondition`` returns.
        """
        return None
