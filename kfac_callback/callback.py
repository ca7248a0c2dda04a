"""The K-FAC callback: hooks, schedules, owners and communication (spec §3–§7).

This file decides *when* things run and *who* runs them; the tensor math lives in
``blocks.py`` and ``linalg.py``. It works with our trainer (through the LBANN hook names) and
from a plain PyTorch loop::

    kfac = KFACCallback(model, damping_act=0.01, damping_err=1.0)
    for x, y in data:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)   # mean over the LOCAL mini-batch
        loss.backward()               # (average gradients over ranks here)
        kfac.step()
        optimizer.step()
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kfac_callback.assignment import LayerInfo, assign_owners
from kfac_callback.base import Callback, SingleProcess, rank0_print
from kfac_callback.blocks import Block, Dampings, is_preconditionable, make_block
from kfac_callback.config import DAMPING_KEYS, KFACConfig, as_damping_list, validate_kfac
from kfac_callback.linalg import all_finite, pack_triangles, unpack_triangles
from kfac_callback.schedules import DampingSchedule, is_compute_step, is_update_step, update_interval

if TYPE_CHECKING:
    from trainer.trainer import Trainer

PREFIX = "K-FAC callback:"
# From this compute interval on, explicit inverses (formed once, then GEMMs) beat Cholesky
# solves at every step (benchmarks/step_time.py).
EXPLICIT_INVERSE_INTERVAL = 5


def make_config(**kwargs: Any) -> KFACConfig:
    """Builds a validated ``KFACConfig`` from keyword arguments.

    Dampings may be numbers, tuples/lists or ``"init,target"`` strings; ``disable_layers`` may
    be a comma-separated string.

    Raises:
        TypeError: For an unknown option.
        ValueError: Listing every invalid option, each naming its key.
    """
    names = {f.name for f in dataclasses.fields(KFACConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"KFACCallback: unknown option(s) {unknown}; known: {sorted(names)}")
    for key in DAMPING_KEYS:
        if key in kwargs:
            kwargs[key] = as_damping_list(kwargs[key])
    if isinstance(kwargs.get("disable_layers"), str):
        kwargs["disable_layers"] = [s for s in kwargs["disable_layers"].split(",") if s.strip()]
    if "disable_layers" in kwargs:
        kwargs["disable_layers"] = [str(s).strip() for s in kwargs["disable_layers"]]
    cfg = KFACConfig(**kwargs)
    errors = validate_kfac(cfg)
    if errors:
        raise ValueError("invalid K-FAC options:\n  " + "\n  ".join(errors))
    return cfg


def _g(x: float) -> str:
    return f"{x:g}"


def _shape(n: int) -> str:
    return f"{n}x{n}"


class KFACCallback(Callback):
    """Kronecker-factored preconditioning of Linear, Conv2d and affine BatchNorm layers.

    Args:
        model: The model; its supported layers not named in ``disable_layers`` are
            preconditioned, every other parameter is left to the base optimizer.
        comm: The communicator (``rank``, ``world_size``, ``allreduce_sum_``, ``broadcast_``).
            ``None`` means one process, or the trainer's ``comm`` at ``on_setup_end``.
        printer: Where lines go; by default printed on rank 0.
        **kwargs: ``KFACConfig`` fields (see ``make_config`` for accepted spellings).

    Attributes:
        config: The validated options.
        blocks: ``{layer name: block}`` in model order.
        owners: ``{layer name: owner rank}``.
        steps: s, the number of completed K-FAC steps.

    Raises:
        ValueError: For invalid options, unknown names in ``disable_layers`` (listing the
            model's preconditionable layers), or a layer K-FAC cannot precondition.
    """

    def __init__(self, model: nn.Module, comm: Any = None,
                 printer: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        self.config = make_config(**kwargs)
        self.model = model
        self._comm_given = comm is not None
        self.comm = comm if comm is not None else SingleProcess()
        self._printer = printer
        self.blocks = self._build_blocks(model, self.config.disable_layers)
        c = self.config
        self.dampings = [DampingSchedule(getattr(c, k), c.damping_warmup_steps)
                         for k in DAMPING_KEYS]
        self.steps = 0
        self.inverse_dtype = getattr(torch, c.inverse_dtype)
        self.owners = self._assign()
        self._captures: dict[str, dict[str, torch.Tensor]] = {}
        # Captures of forward calls whose plain weight gradient autograd skips (skip_weight_grad).
        self._skipped: dict[str, list[dict[str, Any]]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._need_inverses = True
        # Seconds spent per phase of step() since construction (nested phases count in both).
        self.phase_times: dict[str, float] = {}
        self.phase = ""
        self._handles = [block.module.register_forward_hook(self._forward_hook(name))
                         for name, block in self.blocks.items()]

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any, comm: Any = None,
                    printer: Callable[[str], None] | None = None) -> KFACCallback:
        """Builds the callback from a ``KFACConfig``, a mapping, or an OmegaConf ``kfac`` node."""
        if dataclasses.is_dataclass(cfg):
            options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        elif isinstance(cfg, Mapping) or hasattr(cfg, "keys"):
            options = {k: cfg[k] for k in cfg.keys()}
        else:
            raise TypeError(f"from_config: expected a KFACConfig or a mapping, got {type(cfg)}")
        return cls(model, comm=comm, printer=printer, **options)

    # -- construction ----------------------------------------------------------------

    @staticmethod
    def _build_blocks(model: nn.Module, disable: list[str]) -> dict[str, Block]:
        candidates = [name for name, m in model.named_modules() if is_preconditionable(m)]
        unknown = [name for name in disable if name not in candidates]
        if unknown:
            raise ValueError(f"kfac.disable_layers: unknown layer(s) {unknown}; the model's "
                             f"preconditionable layers are {candidates}")
        blocks = {}
        for name, module in model.named_modules():
            if name in disable or not is_preconditionable(module):
                continue
            blocks[name] = make_block(name, module)
        return blocks

    def _assign(self) -> dict[str, int]:
        infos = [LayerInfo(name, b.kind, tuple(b.factor_dims())) for name, b in self.blocks.items()]
        return assign_owners(infos, self.comm.world_size, self.config.inverse_strategy)

    def remove_hooks(self) -> None:
        """Detaches the callback from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- printing --------------------------------------------------------------------

    def _print(self, line: str) -> None:
        (self._printer or rank0_print(self.comm))(line)

    def _warn_once(self, layer: str, what: str, line: str) -> None:
        if (layer, what) not in self._warned:
            self._warned.add((layer, what))
            self._print(line)

    def setup_lines(self) -> list[str]:
        """The options line, then one line per preconditioned layer with its owner rank."""
        c = self.config
        damp = " ".join(f"{k}={','.join(_g(v) for v in getattr(c, k))}" for k in DAMPING_KEYS)
        lines = [
            f"{PREFIX} {damp} damping_warmup_steps={c.damping_warmup_steps} "
            f"update_interval={c.update_interval_init}->{c.update_interval_target} over "
            f"{c.update_interval_steps} steps compute_interval_steps={c.compute_interval_steps} "
            f"kronecker_decay={_g(c.kronecker_decay)} use_pi={int(c.use_pi)} "
            f"use_eigen={int(c.use_eigen)} inverse_strategy={c.inverse_strategy} "
            f"inverse_dtype={c.inverse_dtype} learning_rate_factor={_g(c.learning_rate_factor)} "
            f"disable_layers={','.join(c.disable_layers) or 'none'} "
            f"skip_weight_grad={int(c.skip_weight_grad)} ranks={self.comm.world_size}"]
        for name, b in self.blocks.items():
            shapes = ", ".join(f"{f} {_shape(n)}" for f, n in zip(b.factor_names, b.factor_dims(),
                                                                  strict=True))
            lines.append(f"{PREFIX} layer {name} ({b.kind}): {shapes}, owner rank "
                         f"{self.owners[name]}")
        return lines

    def damping_line(self, epochs: int) -> str:
        """LBANN's epoch-end line with the current dampings, after ``epochs`` epochs."""
        d = self.current_dampings()
        return (f"{PREFIX} changing damping value to {_g(d.act)} (act), {_g(d.err)} (err), "
                f"{_g(d.bn_act)} (bn_act), {_g(d.bn_err)} (bn_err) at {epochs} epochs")

    # -- trainer hooks ---------------------------------------------------------------

    def on_setup_end(self, trainer: Trainer) -> None:
        """Adopts the trainer's communicator (if none was given) and prints the setup lines."""
        comm = getattr(trainer, "comm", None)
        if not self._comm_given and comm is not None:
            self.comm = comm
            self._comm_given = True
            self.owners = self._assign()
        for line in self.setup_lines():
            self._print(line)

    def on_batch_begin(self, trainer: Trainer) -> None:
        """Forgets captures of a step the trainer skipped (a non-finite loss): a new step starts."""
        self._captures = {}
        self._skipped = {}

    def on_backward_prop_end(self, trainer: Trainer) -> None:
        """Preconditions the (rank-averaged) gradients."""
        self.step()

    def on_epoch_end(self, trainer: Trainer) -> None:
        """Prints LBANN's damping line; ``trainer.epoch`` is 0-based."""
        self._print(self.damping_line(trainer.epoch + 1))

    # -- schedules -------------------------------------------------------------------

    def current_dampings(self) -> Dampings:
        """The dampings the next step uses."""
        return Dampings(*(d.value for d in self.dampings))

    def metrics(self) -> dict[str, float]:
        """The current dampings and factor-update interval k(s), for the per-epoch metrics record."""
        d = self.current_dampings()
        c = self.config
        return {
            "kfac_damping_act": d.act,
            "kfac_damping_err": d.err,
            "kfac_damping_bn_act": d.bn_act,
            "kfac_damping_bn_err": d.bn_err,
            "kfac_update_interval": update_interval(self.steps, c.update_interval_init,
                                                    c.update_interval_target, c.update_interval_steps),
        }

    def is_update_step(self) -> bool:
        """Whether the current step updates the factors (and so captures activations)."""
        c = self.config
        return is_update_step(self.steps, c.update_interval_init, c.update_interval_target,
                              c.update_interval_steps)

    def _forward_hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            # Test passes and no-grad evaluation capture nothing. Every training step does:
            # keeping references costs nothing, factors are computed only on update steps,
            # and the captures let fully connected layers precondition through the batch.
            if not (module.training and torch.is_grad_enabled()):
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad or not args:
                return None
            previous = self._captures.get(name)
            capture = {"a": args[0].detach(), "calls": 1 + (previous["calls"] if previous else 0)}
            self._captures[name] = capture
            if previous is None and self._skips_weight_grad(name, args[0]):
                self._skipped.setdefault(name, []).append(capture)
                # A new output whose backward gives the input its gradient and hands the output
                # gradient to the capture; the graph of `output`, with its weight GEMM, is dropped.
                return _WithoutWeightGrad.apply(args[0], module.weight, _Carry(output.detach(), capture))

            def grad_hook(grad: torch.Tensor) -> None:
                capture["g"] = grad.detach()

            # A tensor hook (rather than a full backward hook) tolerates in-place ops such as
            # ReLU(inplace=True) after the layer: it sees the gradient of the layer's output.
            output.register_hook(grad_hook)
            return None

        return hook

    def _skips_weight_grad(self, name: str, a: torch.Tensor) -> bool:
        """Whether this forward call may leave the weight gradient to ``step()`` (skip_weight_grad).

        Only where ``step()`` can rebuild exactly what autograd would have accumulated: a
        bias-free fully connected layer whose cheaper route is the (gathered) batch's. Every
        rank decides alike (equal local batches, same layers), so every rank leaves the same
        gradients out of the gradient all-reduce. (Whether a gradient is left from before, to
        accumulate onto, is known only at ``step()``: the usual loop zeroes gradients between
        forward and backward.)
        """
        block = self.blocks[name]
        return (self.config.skip_weight_grad and block.kind == "linear"
                and not block.has_bias and block.module.weight.requires_grad and a.dim() == 2
                and block.batch_route_cheaper(a.shape[0] * self.comm.world_size))

    # -- the step --------------------------------------------------------------------

    def step(self) -> None:
        """One K-FAC step; call it after backward (and gradient averaging), before the optimizer.

        The gradients must be as backward left them: a fully connected layer's preconditioned
        gradient is built from the batch's inputs and output gradients (``set_batch``), so an
        edit of ``.grad`` in between (clipping, say) would be lost; edit after this step.

        On factor-update steps the captured inputs and output gradients become factors
        (summed over ranks in one collective) and are folded into the running averages; on
        compute steps each owner recomputes its layers' inverses; every step every layer with
        inverses is preconditioned by its owner and the result broadcast. Then the damping
        schedule and the step counter advance.
        """
        s = self.steps
        damping = self.current_dampings()
        captures = self._captures
        if captures and self.is_update_step():
            with self._phase("factors"):
                self._update_factors(s)
        self._captures = {}
        skipped, self._skipped = self._skipped, {}
        if is_compute_step(s, self.config.compute_interval_steps) or self._need_inverses:
            with self._phase("inverses"):
                self._compute_inverses(s, damping)
        with self._phase("batch_gather"):
            self._offer_batches(captures)
        with self._phase("precondition"):
            done = self._precondition_skipped(s, skipped)
            self._precondition(s, done)
        for d in self.dampings:
            d.advance()
        self.steps += 1

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Names the running phase (a benchmark's communicator reads ``phase``) and times it."""
        outer, self.phase = self.phase, name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_times[name] = self.phase_times.get(name, 0.0) + time.perf_counter() - start
            self.phase = outer

    def _update_factors(self, s: int) -> None:
        if self.comm.world_size == 1:
            self._accumulate_factors(s)
            return
        world = self.comm.world_size
        names = list(self.blocks)
        dtype = torch.float32
        for b in self.blocks.values():
            dtype = torch.promote_types(dtype, b.dtype)
        parts, dims = [], []
        present = []
        for name in names:
            block, cap = self.blocks[name], self._captures.get(name)
            layer_dims = block.factor_dims()
            dims.extend(layer_dims)
            if cap is not None and "g" in cap:
                n_global = cap["a"].shape[0] * world
                mats = block.contributions(cap["a"], cap["g"], n_global)
                present.append(1.0)
            else:
                # Keeps the packed layout identical on every rank; the flag below says the
                # layer is incomplete.
                weight = block.module.weight
                mats = [torch.zeros(n, n, dtype=weight.dtype, device=weight.device)
                        for n in layer_dims]
                present.append(0.0)
            parts.extend(m.to(dtype) for m in mats)
        if not parts:
            return
        # All layers' triangles and the presence flags in one collective (spec §6).
        device = self.blocks[names[0]].module.weight.device
        flags = torch.tensor(present, dtype=dtype, device=device)
        flat = torch.cat([pack_triangles(parts), flags])
        with self._phase("factor_allreduce"):
            self.comm.allreduce_sum_([flat])
        counts = flat[-len(names):].tolist()
        mats = unpack_triangles(flat[:-len(names)], dims)
        i = 0
        for name, count in zip(names, counts, strict=True):
            block = self.blocks[name]
            k = len(block.factor_names)
            layer_mats, i = mats[i:i + k], i + k
            if round(count) != world:
                continue  # some rank saw no forward/backward of this layer this step
            if not block.update_factors(layer_mats, self.config.kronecker_decay):
                self._warn_bad_factor(s, name)

    def _accumulate_factors(self, s: int) -> None:
        """One rank: each layer's batch factors go straight into its running averages."""
        for name, block in self.blocks.items():
            cap = self._captures.get(name)
            if cap is None or "g" not in cap:
                continue  # no forward/backward of this layer this step
            if not block.accumulate(cap["a"], cap["g"], cap["a"].shape[0], self.config.kronecker_decay):
                self._warn_bad_factor(s, name)

    def _warn_bad_factor(self, s: int, name: str) -> None:
        self._warn_once(name, "factor", f"{PREFIX} step {s}: layer {name}: non-finite "
                        "Kronecker factor skipped (running average kept)")

    def _offer_batches(self, captures: dict[str, dict[str, Any]]) -> None:
        """Lets fully connected layers precondition through this step's batch (cheaper).

        A layer qualifies when it ran forward exactly once since the last step (no weight
        sharing, no gradient accumulation), so that its gradient is exactly ``gᵀa`` of the
        batch, and when that route costs fewer flops. With several ranks the averaged
        gradient is ``(1/R) Σ_r g_rᵀ a_r``: the ranks' ``a`` and ``g`` rows are gathered in one
        collective, far fewer numbers than the gradient itself for the MLP (N·(in+out) vs in·out).
        """
        linear = {n: b for n, b in self.blocks.items() if hasattr(b, "set_batch")}
        usable = {}
        for name, block in linear.items():
            block.set_batch(None, None)
            cap = captures.get(name, {})
            usable[name] = (block.kind == "linear" and cap.get("calls") == 1 and "g" in cap
                            and cap["a"].dim() == 2 and block.batch_route_cheaper(cap["a"].shape[0] * self.comm.world_size))
        if self.comm.world_size == 1:
            for name, block in linear.items():
                if usable[name]:
                    block.set_batch(captures[name]["a"], captures[name]["g"])
            return
        self._gather_batches(linear, captures, usable)

    def _gather_batches(self, linear: dict[str, Block], captures: dict[str, dict[str, Any]],
                        usable: dict[str, bool]) -> None:
        """Gathers every rank's ``a`` and ``g`` rows of the qualifying layers in one allreduce.

        Each rank writes its rows into its own slot of a zeroed buffer, so the sum is the
        gathered batch. A flag per layer counts the ranks that could take part; a layer uses
        the batch route only when all could, so every rank takes the same decision.
        """
        present = [captures[n] for n in linear if usable[n]]
        if not present:
            return  # no captures on this step, on any rank (the schedule is the same everywhere)
        n_local = present[0]["a"].shape[0]
        world, rank = self.comm.world_size, self.comm.rank
        dims = {n: (b.in_features(), b.out_features()) for n, b in linear.items()}
        slot = sum(n_local * (d_in + d_out) for d_in, d_out in dims.values())
        ref = present[0]["a"]
        buf = torch.zeros(world * slot + len(linear), dtype=ref.dtype, device=ref.device)
        offset = rank * slot
        for i, (name, (d_in, d_out)) in enumerate(dims.items()):
            size = n_local * (d_in + d_out)
            cap = captures.get(name, {})
            if usable[name] and cap["a"].shape[0] == n_local:
                buf[offset:offset + n_local * d_in] = cap["a"].reshape(-1)
                buf[offset + n_local * d_in:offset + size] = cap["g"].reshape(-1)
                buf[world * slot + i] = 1
            offset += size
        self.comm.allreduce_sum_([buf])
        flags = buf[world * slot:].tolist()
        start = 0
        for i, (name, (d_in, d_out)) in enumerate(dims.items()):
            size = n_local * (d_in + d_out)
            if round(flags[i]) == world:
                per_rank = buf[:world * slot].view(world, slot)[:, start:start + size]
                a = per_rank[:, :n_local * d_in].reshape(world * n_local, d_in)
                g = per_rank[:, n_local * d_in:].reshape(world * n_local, d_out) / world
                linear[name].set_batch(a, g)
            start += size

    def _compute_inverses(self, s: int, damping: Dampings) -> None:
        c = self.config
        for name, block in self.blocks.items():
            if self.owners[name] != self.comm.rank:
                block.clear_inverses()
                continue
            start = time.perf_counter()
            ok = block.compute_inverses(damping, c.use_pi, c.use_eigen, self.inverse_dtype,
                                        explicit=c.compute_interval_steps >= EXPLICIT_INVERSE_INTERVAL)
            elapsed = time.perf_counter() - start
            if c.print_time and block.has_factors:
                self._print(f"{PREFIX} step {s}: inverses of {name} took {elapsed * 1e3:.3f} ms "
                            f"on rank {self.comm.rank}")
            for note in block.inverse_notes:
                self._warn_once(name, "inverse " + note.split(":")[0],
                                f"{PREFIX} step {s}: layer {name}: {note}")
            if not ok and block.has_factors:
                self._warn_once(name, "plain", f"{PREFIX} step {s}: layer {name}: no usable "
                                "inverse; the layer keeps its plain gradient")
            if c.print_matrix_summary or c.print_matrix:
                self._print_matrices(s, name, block)
        self._need_inverses = False

    def _print_matrices(self, s: int, name: str, block: Block) -> None:
        inverses = [f"{f}_inv" for f in block.factor_names]
        for attr in (*block.factor_names, *inverses):
            mat = getattr(block, attr, None)
            if mat is None:
                continue
            if self.config.print_matrix_summary:
                self._print(f"{PREFIX} step {s}: layer {name}: {attr} {_shape(mat.shape[0])} "
                            f"norm {float(mat.norm()):g} min {float(mat.min()):g} "
                            f"max {float(mat.max()):g} trace {float(mat.trace()):g}")
            if self.config.print_matrix:
                self._print(f"{PREFIX} step {s}: layer {name}: {attr} =\n{mat}")

    def _say_zeroed(self, s: int, name: str) -> None:
        self._print(f"{PREFIX} step {s}: layer {name}: non-finite gradient; zeroed for this step")

    def _warn_plain_kept(self, s: int, name: str) -> None:
        self._warn_once(name, "precond", f"{PREFIX} step {s}: layer {name}: "
                        "preconditioned gradient not finite; plain gradient kept")

    def _precondition_skipped(self, s: int, skipped: dict[str, list[dict[str, Any]]]) -> set[str]:
        """Writes the weight gradients that backward skipped (skip_weight_grad).

        Through the batch (every rank's rows, gathered) where one was offered and no gradient
        is left from before: a non-finite batch zeroes the gradient on every rank (said, as in
        ``_precondition``); else the owner writes the preconditioned gradient, or the plain
        ``gᵀa`` of the batch where it cannot precondition, and the others receive it in the
        owners' broadcast. Otherwise each rank rebuilds its plain ``Σ gᵀa`` (exactly what
        autograd would have added), averaged over ranks in one collective; the layer then goes
        the usual way (finiteness check, preconditioning). Every rank skipped the same layers
        and sees the same batch flags, so all take the same branches.

        Returns:
            The layers finished here.
        """
        done, rebuild = set(), {}
        f = self.config.learning_rate_factor
        for name, captures in skipped.items():
            block = self.blocks[name]
            weight = block.module.weight
            if weight.grad is not None or not block.has_batch:
                rebuild[name] = captures
                continue
            done.add(name)
            a, g = block.batch
            if not block.batch_finite():
                self._say_zeroed(s, name)
                weight.grad = torch.zeros_like(weight)
                block.set_batch(None, None)
                continue
            weight.grad = torch.empty_like(weight)  # on the other ranks, filled by the broadcast
            if self.owners[name] != self.comm.rank:
                continue
            if block.has_inverses and block.precondition(f):
                continue
            if block.has_inverses:
                self._warn_plain_kept(s, name)
            weight.grad = block.weight_grad(a, g)
            if not all_finite(weight.grad):  # finite rows whose product overflowed
                self._say_zeroed(s, name)
                weight.grad.zero_()
        if rebuild:
            self._rebuild_plain(rebuild)
        return done

    def _rebuild_plain(self, skipped: dict[str, list[dict[str, Any]]]) -> None:
        """Adds each layer's rank-averaged ``Σ gᵀa`` to its gradient (none if no rank saw a backward)."""
        plains, seen = [], []
        for name, captures in skipped.items():
            block = self.blocks[name]
            parts = [block.weight_grad(cap["a"], cap["g"]) for cap in captures if "g" in cap]
            weight = block.module.weight
            plains.append(torch.stack(parts).sum(0) if parts else torch.zeros_like(weight))
            seen.append(float(bool(parts)))
        counts = torch.tensor(seen, dtype=plains[0].dtype, device=plains[0].device)
        if self.comm.world_size > 1:
            self.comm.allreduce_sum_([*plains, counts])
            for plain in plains:
                plain /= self.comm.world_size
        for name, plain, count in zip(skipped, plains, counts.tolist(), strict=True):
            weight = self.blocks[name].module.weight
            if count:
                weight.grad = plain if weight.grad is None else weight.grad.add_(plain)

    def _precondition(self, s: int, done: set[str] = frozenset()) -> None:
        # Gradients are identical on all ranks here, so every rank takes the same decisions.
        for name, block in self.blocks.items():
            if name in done:
                continue
            if not block.grads_finite():
                self._say_zeroed(s, name)
                block.zero_grads()
                if hasattr(block, "set_batch"):
                    block.set_batch(None, None)  # the batch route would bring the gradient back
        f = self.config.learning_rate_factor
        for name, block in self.blocks.items():
            if name in done:
                continue
            if self.owners[name] == self.comm.rank and block.has_inverses:
                if not block.precondition(f):
                    self._warn_plain_kept(s, name)
        if self.comm.world_size > 1:
            self._broadcast_gradients()

    def _broadcast_gradients(self) -> None:
        """Sends each owner's (preconditioned) gradients to the other ranks, one per owner."""
        with self._phase("exchange"):
            self._broadcast_from_owners()

    def _broadcast_from_owners(self) -> None:
        for owner in range(self.comm.world_size):
            grads = []
            for name, block in self.blocks.items():
                layer_grads = block.grads()
                if self.owners[name] == owner and layer_grads is not None:
                    grads.extend(layer_grads)
            if not grads:
                continue
            dtype = grads[0].dtype
            for g in grads:
                dtype = torch.promote_types(dtype, g.dtype)
            flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
            self.comm.broadcast_([flat], owner)
            if self.comm.rank != owner:
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

    # -- checkpoints -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Running averages, update counts, dampings, the step counter and the inverses.

        With several ranks this is a collective that every rank must call: a layer's inverses
        live on its owner only, so they are gathered here. A resumed run (with any number of
        ranks) then preconditions with exactly the same inverses until the next compute step.
        """
        inverses = {name: b.export_inverses() if self.owners[name] == self.comm.rank else {}
                    for name, b in self.blocks.items()}
        if self.comm.world_size > 1 and self.blocks:
            codes = {torch.float32: 1, torch.float64: 2}
            slots = [(name, f"{f}.{kind}", n) for name, b in self.blocks.items()
                     for f, n in zip(b.factor_names, b.factor_dims(), strict=True)
                     for kind in ("chol", "inverse")]
            device = next(iter(self.blocks.values())).module.weight.device
            # What each owner holds (dtype codes) and its π, summed so every rank knows.
            header = torch.zeros(len(slots) + len(self.blocks), dtype=torch.float64, device=device)
            for i, (name, key, _) in enumerate(slots):
                if key in inverses[name]:
                    header[i] = codes[inverses[name][key].dtype]
            for j, name in enumerate(self.blocks):
                header[len(slots) + j] = float(inverses[name].get("pi", 0.0))
            self.comm.allreduce_sum_([header])
            held = header.tolist()
            dtypes = {code: dtype for dtype, code in codes.items()}
            gathered: dict[str, dict[str, Any]] = {name: {} for name in self.blocks}
            for owner in range(self.comm.world_size):
                mine = [(i, name, key, n) for i, (name, key, n) in enumerate(slots)
                        if self.owners[name] == owner and held[i]]
                if not mine:
                    continue
                if self.comm.rank == owner:  # float64 carries float32 values exactly
                    flat = torch.cat([inverses[name][key].reshape(-1).to(torch.float64)
                                      for _, name, key, _ in mine])
                else:
                    flat = torch.empty(sum(n * n for *_, n in mine), dtype=torch.float64, device=device)
                self.comm.broadcast_([flat], owner)
                offset = 0
                for i, name, key, n in mine:
                    gathered[name][key] = flat[offset:offset + n * n].view(n, n).to(dtypes[round(held[i])]).clone()
                    offset += n * n
            for j, name in enumerate(self.blocks):
                if gathered[name]:
                    gathered[name]["pi"] = held[len(slots) + j]
            inverses = gathered
        return {
            "steps": self.steps,
            "dampings": [d.value for d in self.dampings],
            "factors": {name: [None if m is None else m.detach().clone() for m in b.factors()]
                        for name, b in self.blocks.items()},
            "updates": {name: b.updates for name, b in self.blocks.items()},
            "inverses": inverses,
            "need_inverses": self._need_inverses,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``, the inverses too (each rank keeps those it owns now).

        A state without inverses (an older one) has them recomputed at the next step.

        Raises:
            ValueError: If the state's layers differ from this callback's.
        """
        if set(state["factors"]) != set(self.blocks):
            raise ValueError(f"K-FAC state has layers {sorted(state['factors'])}, the callback "
                             f"has {sorted(self.blocks)}")
        self.steps = int(state["steps"])
        for d, v in zip(self.dampings, state["dampings"], strict=True):
            d.value = float(v)
        inverses = state.get("inverses")
        for name, block in self.blocks.items():
            block.set_factors(list(state["factors"][name]))
            block.updates = int(state["updates"][name])
            block.clear_inverses()
            if inverses is not None and self.owners[name] == self.comm.rank:
                block.import_inverses(dict(inverses.get(name, {})))
        self._captures = {}
        self._skipped = {}
        self._need_inverses = inverses is None or bool(state.get("need_inverses", False))


class _Carry:
    """An already computed output and its capture, passed through ``_WithoutWeightGrad``
    untouched by autograd (an output that is also an input would become a view, which
    in-place ops such as ReLU(inplace=True) after the layer may not modify)."""

    def __init__(self, output: torch.Tensor, capture: dict[str, Any]) -> None:
        self.output, self.capture = output, capture


class _WithoutWeightGrad(torch.autograd.Function):
    """``y = x Wᵀ`` (computed by the layer already) whose backward computes only ``∂L/∂x = g W``.

    W gets no gradient from backward: ``KFACCallback.step()`` writes it. The output gradient g
    goes to the layer's capture, as the tensor hook of the ordinary path would put it.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, carry: _Carry) -> torch.Tensor:
        ctx.capture = carry.capture
        ctx.save_for_backward(weight)
        return carry.output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        ctx.capture["g"] = grad.detach()
        (weight,) = ctx.saved_tensors
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None
