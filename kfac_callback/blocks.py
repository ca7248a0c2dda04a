"""Curvature blocks: per layer type, the tensor math of K-FAC (spec §3, §4, §5).

A block holds one layer's running-average factors and inverses and knows how to turn the
layer's captured input and output gradient into factor contributions, and its gradient into
the preconditioned gradient. It decides nothing about *when*; that is the callback's job.

Convention (spec §3): the loss is a mean over the LOCAL mini-batch of ``n`` samples and each
of ``R`` ranks holds an equal share, so the global batch is ``N = n·R``. A captured
``grad_output`` is the gradient of the local mean loss, so the per-sample gradient is
``n·grad_output_i`` and the global ``e_i = grad_output_i·n/N``. Each rank's contribution uses
the global ``N``; the sum of the contributions over ranks is the factor of the global batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kfac_callback.linalg import DampedInverse, all_finite, damped_inverse, pi_factor


class Dampings(NamedTuple):
    """The four current damping values (spec §4)."""

    act: float
    err: float
    bn_act: float
    bn_err: float


class Block:
    """Base class: one preconditioned layer's factors, inverses and gradient transform.

    Attributes:
        name: The layer's name in ``model.named_modules()``.
        module: The layer.
        kind: ``"linear"``, ``"conv2d"`` or ``"batchnorm"``.
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
        """The layer's (and the factors') dtype."""
        return self.module.weight.dtype

    def factor_dims(self) -> list[int]:
        """Sizes of the square factors, in ``factor_names`` order."""
        raise NotImplementedError

    def gram_terms(self, a: torch.Tensor, g: torch.Tensor, n_global: int) -> list[tuple[torch.Tensor, float]]:
        """Each factor's contribution as rows X and a scale c, the factor being ``c·XᵀX``.

        In ``factor_names`` order. Keeping the product unformed lets one rank fold it straight
        into the running average with a single GEMM (``accumulate``).

        Args:
            a: The layer's input, batch first.
            g: The gradient of the local mean loss with respect to the layer's output.
            n_global: N, the global mini-batch size (local batch × ranks).
        """
        raise NotImplementedError

    def contributions(self, a: torch.Tensor, g: torch.Tensor, n_global: int) -> list[torch.Tensor]:
        """This rank's factor contributions ``c·XᵀX``, in ``factor_names`` order (see ``gram_terms``)."""
        return [(x.mT @ x).mul_(c) for x, c in self.gram_terms(a, g, n_global)]

    def accumulate(self, a: torch.Tensor, g: torch.Tensor, n_global: int, decay: float) -> bool:
        """Folds this batch's factors into the running averages in one GEMM each (one rank).

        Same result as ``update_factors(contributions(...))`` without forming the batch
        factors: ``old ← decay·old + (1-decay)·c·XᵀX`` is one ``addmm_``. Every entry of
        ``c·XᵀX`` is bounded by ``c·‖X‖²`` (Cauchy–Schwarz), so that one number being finite
        proves the new factor finite before anything is touched.

        Returns:
            ``False`` (and nothing changes) if a new factor would not be finite.
        """
        terms = [(x.to(self.dtype), c) for x, c in self.gram_terms(a, g, n_global)]
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
        """Folds new factors into the running averages (spec §3).

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
        """Replaces the gradients by the preconditioned gradients (spec §5).

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


class KroneckerBlock(Block):
    """A layer whose curvature is ``A ⊗ G`` (fully connected and convolution layers).

    Attributes:
        A: Running average of the activation factor (with the bias row/column last).
        G: Running average of the output-gradient factor.
        A_inv, G_inv: Inverses of the damped factors, or ``None``.
    """

    factor_names = ("A", "G")

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self._a_inv: DampedInverse | None = None
        self._g_inv: DampedInverse | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pi = 1.0

    @property
    def A_inv(self) -> torch.Tensor | None:  # noqa: N802 (the spec's name)
        """The inverse of the damped A (formed from its Cholesky factor on first use)."""
        return None if self._a_inv is None else self._a_inv.inverse

    @property
    def G_inv(self) -> torch.Tensor | None:  # noqa: N802 (the spec's name)
        """The inverse of the damped G (formed from its Cholesky factor on first use)."""
        return None if self._g_inv is None else self._g_inv.inverse

    def set_batch(self, a: torch.Tensor | None, g: torch.Tensor | None) -> None:
        """Offers this step's input and output gradient, whose product is the gradient.

        Valid only when the layer's gradient is exactly ``gᵀ[a|1]`` (one rank, one forward
        and backward since the last step). Then ``G⁻¹ gᵀ`` and ``[a|1] A⁻¹`` go through the
        batch: 2N(out² + in² + out·in) flops instead of 2·out·in·(out + in).
        """
        self._batch = None if a is None or g is None else (a, g)

    @property
    def has_batch(self) -> bool:
        """Whether this step's batch was offered (``set_batch``) and not used yet."""
        return self._batch is not None

    @property
    def batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The offered ``(a, g)`` (``set_batch``), or ``None``."""
        return self._batch

    def batch_finite(self) -> bool:
        """Whether a batch was offered and its inputs and output gradients are all finite."""
        return self._batch is not None and all(all_finite(t) for t in self._batch)

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias (an extra input of constant 1)."""
        return getattr(self.module, "bias", None) is not None

    def out_features(self) -> int:
        """Rows of the weight viewed as a matrix."""
        return self.module.weight.shape[0]

    def in_features(self) -> int:
        """Columns of the weight viewed as a matrix, without the bias column."""
        return self.module.weight[0].numel()

    def factor_dims(self) -> list[int]:
        return [self.in_features() + int(self.has_bias), self.out_features()]

    def _with_ones(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)

    def compute_inverses(self, damping: Dampings, use_pi: bool = False, use_eigen: bool = False,
                         dtype: torch.dtype = torch.float32, explicit: bool = False) -> bool:
        self.clear_inverses()
        self.inverse_notes = []
        if not self.has_factors:
            return False
        self.pi = pi_factor(self.A, self.G) if use_pi else 1.0
        dtype = self.inverse_dtype(dtype)
        chol = not use_eigen
        a = damped_inverse(self.A, damping.act * self.pi, dtype, use_eigen, cholesky_only=chol)
        g = damped_inverse(self.G, damping.err / self.pi, dtype, use_eigen, cholesky_only=chol)
        self.inverse_notes = [f"{n}: {r.note}" for n, r in (("A", a), ("G", g)) if r.note]
        if a.inverse is None or g.inverse is None:
            return False
        if chol and explicit:
            # Inverses reused over many steps: forming them once makes every later product a
            # GEMM, about twice as fast here as the two triangular solves of a Cholesky solve.
            self._a_inv = DampedInverse(inverse=torch.cholesky_inverse(a.inverse))
            self._g_inv = DampedInverse(inverse=torch.cholesky_inverse(g.inverse))
        elif chol:
            self._a_inv, self._g_inv = DampedInverse(chol=a.inverse), DampedInverse(chol=g.inverse)
        else:
            self._a_inv, self._g_inv = DampedInverse(inverse=a.inverse), DampedInverse(inverse=g.inverse)
        return True

    def clear_inverses(self) -> None:
        self._a_inv = self._g_inv = None

    @property
    def has_inverses(self) -> bool:
        return self._a_inv is not None and self._g_inv is not None

    def export_inverses(self) -> dict[str, torch.Tensor | float]:
        if not self.has_inverses:
            return {}
        state: dict[str, torch.Tensor | float] = {"pi": self.pi}
        for factor, inv in (("A", self._a_inv), ("G", self._g_inv)):
            # Both forms as held: the lazily formed explicit inverse is kept too, so a resumed
            # run multiplies by exactly the same tensors.
            for key, tensor in (("chol", inv.chol), ("inverse", inv._inverse)):
                if tensor is not None:
                    state[f"{factor}.{key}"] = tensor.detach().clone()
        return state

    def import_inverses(self, state: dict[str, torch.Tensor | float]) -> None:
        device = self.module.weight.device
        held = []
        for factor in ("A", "G"):
            chol, inverse = state.get(f"{factor}.chol"), state.get(f"{factor}.inverse")
            held.append(None if chol is None and inverse is None else DampedInverse(
                chol=None if chol is None else chol.to(device),
                inverse=None if inverse is None else inverse.to(device)))
        self._a_inv, self._g_inv = held
        if not self.has_inverses:
            self._a_inv = self._g_inv = None
        self.pi = float(state.get("pi", 1.0))

    def _grad_matrix(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """``[∇W | ∇b]`` with ∇W viewed as out × in (conv: C_out × C_in·kh·kw)."""
        gw = grads[0].reshape(self.out_features(), -1)
        if self.has_bias:
            gw = torch.cat([gw, grads[1].reshape(-1, 1)], dim=1)
        return gw

    def batch_route_cheaper(self, n: int) -> bool:
        """Whether preconditioning through ``n`` samples costs fewer flops than the direct route."""
        d_out, d_in = self.out_features(), self.in_features() + int(self.has_bias)
        return n * (d_out * d_out + d_in * d_in + d_out * d_in) < d_out * d_in * (d_out + d_in)

    def _batch_halves(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``G⁻¹gᵀ`` (out × N) and ``A⁻¹[a|1]ᵀ`` (in × N), when this step's batch was offered
        and that route is cheaper; their product ``left @ rightᵀ`` is the preconditioned gradient."""
        batch, self._batch = self._batch, None
        if batch is None:
            return None
        a, g = batch
        rows = self._with_ones(a.reshape(-1, a.shape[-1]))
        g = g.reshape(-1, g.shape[-1])
        if not self.batch_route_cheaper(rows.shape[0]):
            return None
        dtype = self._g_inv.dtype
        left = self._g_inv.solve(g.mT.to(dtype))
        right = self._a_inv.solve(rows.mT.to(dtype))  # A⁻¹ is symmetric
        return left, right

    def _through_batch(self) -> torch.Tensor | None:
        """``(G⁻¹gᵀ)([a|1]A⁻¹)`` when this step's batch was offered and that route is cheaper."""
        halves = self._batch_halves()
        return None if halves is None else halves[0] @ halves[1].mT

    def _precondition_in_place(self, grads: list[torch.Tensor], lr_factor: float) -> bool | None:
        weight = grads[0]
        if (self._batch is None or self.has_bias or lr_factor != 1.0 or not weight.is_contiguous()
                or weight.dtype != self._g_inv.dtype):
            return None
        halves = self._batch_halves()
        if halves is None:
            return None
        left, right = halves
        # |(L Rᵀ)_ij| ≤ ‖L‖·‖R‖, so one finite product of norms proves every entry finite: the
        # product can go straight into the gradient, without a check and a copy of its own.
        if not bool(torch.isfinite(left.norm() * right.norm())):
            return False
        torch.mm(left, right.mT, out=weight.view(left.shape[0], right.shape[0]))
        return True

    def _preconditioned(self, grads: list[torch.Tensor], lr_factor: float) -> list[torch.Tensor]:
        p = self._through_batch()
        if p is None:
            mat = self._grad_matrix(grads).to(self._g_inv.dtype)
            # G⁻¹ M A⁻¹: two solves with Cholesky factors, or two GEMMs with explicit inverses.
            p = self._a_inv.solve_right(self._g_inv.solve(mat))
        if lr_factor != 1.0:
            p = p.mul(lr_factor)
        # Written back in each parameter's own layout (conv: not transposed, unlike LBANN).
        weight = grads[0]
        out = [p[:, :self.in_features()].reshape(weight.shape).to(weight.dtype)]
        if self.has_bias:
            out.append(p[:, -1].reshape(grads[1].shape).to(grads[1].dtype))
        return out


class LinearBlock(KroneckerBlock):
    """``nn.Linear``: ``A = (1/N) Σ ā āᵀ``, ``G = N Σ e eᵀ`` (spec §3).

    Inputs with more than two dimensions are flattened to rows (every leading index is a
    sample position); ``n`` is the size of the first dimension.
    """

    kind = "linear"

    def weight_grad(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The weight gradient autograd gives one forward call: ``gᵀa`` over every sample row."""
        rows = a.reshape(-1, a.shape[-1])
        return (g.reshape(-1, g.shape[-1]).mT @ rows).to(self.dtype)

    def gram_terms(self, a: torch.Tensor, g: torch.Tensor, n_global: int) -> list[tuple[torch.Tensor, float]]:
        n = a.shape[0]
        rows = self._with_ones(a.reshape(-1, a.shape[-1]).to(self.dtype))
        gr = g.reshape(-1, g.shape[-1]).to(self.dtype)
        # A = (1/N) Σ ā āᵀ; G = N Σ e eᵀ with e = grad_output·n/N: (n²/N) Σ grad_output grad_outputᵀ.
        return [(rows, 1.0 / n_global), (gr, n * n / n_global)]


def _conv_padding(name: str, conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's padding as two ints, refusing what ``unfold`` cannot reproduce."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        if any(k % 2 == 0 for k in conv.kernel_size):
            raise ValueError(f"K-FAC: layer {name!r}: padding='same' with an even kernel "
                             "(asymmetric padding) is not supported")
        return tuple((k - 1) // 2 for k in conv.kernel_size)
    return tuple(conv.padding)


class Conv2dBlock(KroneckerBlock):
    """``nn.Conv2d`` (KFC): patches from ``unfold``, ``G`` scaled by N/|T| (spec §3).

    Raises:
        ValueError: For dilation or groups other than 1, or a padding mode other than zeros,
            naming the layer.
    """

    kind = "conv2d"

    def __init__(self, name: str, module: nn.Conv2d) -> None:
        if tuple(module.dilation) != (1, 1) or module.groups != 1:
            raise ValueError(f"K-FAC: layer {name!r}: convolution with dilation "
                             f"{tuple(module.dilation)} and groups {module.groups} is not "
                             "supported (both must be 1); disable it with kfac.disable_layers")
        if module.padding_mode != "zeros":
            raise ValueError(f"K-FAC: layer {name!r}: padding_mode {module.padding_mode!r} is not "
                             "supported (only 'zeros'); disable it with kfac.disable_layers")
        super().__init__(name, module)
        self.padding = _conv_padding(name, module)

    def gram_terms(self, a: torch.Tensor, g: torch.Tensor, n_global: int) -> list[tuple[torch.Tensor, float]]:
        conv = self.module
        n = a.shape[0]
        # (n, C_in·kh·kw, T): the channel-major patch layout matches weight.reshape(C_out, -1).
        patches = F.unfold(a.to(self.dtype), conv.kernel_size, padding=self.padding,
                           stride=conv.stride)
        rows = self._with_ones(patches.transpose(1, 2).reshape(-1, patches.shape[1]))
        positions = g.shape[2] * g.shape[3]
        gr = g.to(self.dtype).permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        # A = (1/N) Σ p̄ p̄ᵀ; G = (N/|T|) Σ e eᵀ with e = grad_output·n/N.
        return [(rows, 1.0 / n_global), (gr, n * n / (n_global * positions))]


class BatchNormBlock(Block):
    """Affine ``nn.BatchNorm1d/2d``: one 2C×2C factor ``F`` over ``[γ; β]`` (spec §3).

    The factor is built from the NORMALISED input x̂ (batch statistics, as in training mode),
    not the raw input that LBANN's callback used.

    Attributes:
        F: Running average of the factor.
        F_inv: Inverse of the damped factor, or ``None``.
    """

    kind = "batchnorm"
    factor_names = ("F",)

    def __init__(self, name: str, module: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__(name, module)
        self.F: torch.Tensor | None = None
        self.F_inv: torch.Tensor | None = None

    def factor_dims(self) -> list[int]:
        return [2 * self.module.num_features]

    def normalised(self, a: torch.Tensor) -> torch.Tensor:
        """x̂ of a training-mode forward, shaped (n, C, S)."""
        x = a.to(self.dtype).reshape(a.shape[0], a.shape[1], -1)
        mean = x.mean(dim=(0, 2), keepdim=True)
        var = x.var(dim=(0, 2), unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.module.eps)

    def gram_terms(self, a: torch.Tensor, g: torch.Tensor, n_global: int) -> list[tuple[torch.Tensor, float]]:
        n = a.shape[0]
        xhat = self.normalised(a)
        gr = g.to(self.dtype).reshape(xhat.shape)
        u = torch.cat([(gr * xhat).sum(dim=2), gr.sum(dim=2)], dim=1)
        # N Σ u uᵀ with u built from e = grad_output·n/N.
        return [(u, n * n / n_global)]

    def compute_inverses(self, damping: Dampings, use_pi: bool = False, use_eigen: bool = False,
                         dtype: torch.dtype = torch.float32, explicit: bool = False) -> bool:
        self.clear_inverses()
        self.inverse_notes = []
        if not self.has_factors:
            return False
        c = self.module.num_features
        diag = torch.cat([torch.full((c,), damping.bn_act, dtype=torch.float64),
                          torch.full((c,), damping.bn_err, dtype=torch.float64)])
        r = damped_inverse(self.F, diag, self.inverse_dtype(dtype), use_eigen)
        self.inverse_notes = [f"F: {r.note}"] if r.note else []
        self.F_inv = r.inverse
        return r.inverse is not None

    def clear_inverses(self) -> None:
        self.F_inv = None

    @property
    def has_inverses(self) -> bool:
        return self.F_inv is not None

    def export_inverses(self) -> dict[str, torch.Tensor | float]:
        return {} if self.F_inv is None else {"F.inverse": self.F_inv.detach().clone()}

    def import_inverses(self, state: dict[str, torch.Tensor | float]) -> None:
        inverse = state.get("F.inverse")
        self.F_inv = None if inverse is None else inverse.to(self.module.weight.device)

    def _preconditioned(self, grads: list[torch.Tensor], lr_factor: float) -> list[torch.Tensor]:
        v = torch.cat([grads[0].reshape(-1), grads[1].reshape(-1)]).to(self.F_inv.dtype)
        p = (self.F_inv @ v).mul_(lr_factor)
        c = self.module.num_features
        return [p[:c].to(grads[0].dtype), p[c:].to(grads[1].dtype)]


def make_block(name: str, module: nn.Module) -> Block | None:
    """The block for a supported layer, or ``None`` if the base optimizer keeps it.

    Raises:
        ValueError: For a supported type in a configuration K-FAC cannot precondition.
    """
    if isinstance(module, nn.Linear):
        return LinearBlock(name, module)
    if isinstance(module, nn.Conv2d):
        return Conv2dBlock(name, module)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.affine:
        return BatchNormBlock(name, module)
    return None


def is_preconditionable(module: nn.Module) -> bool:
    """Whether K-FAC has a block for this layer type (configuration not checked)."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) or (
        isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.affine)
