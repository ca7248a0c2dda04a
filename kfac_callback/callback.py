"""The K-FAC callback: when each part of a K-FAC step runs, and on which rank.

The tensor math lives in the blocks (``blocks/``) and ``linalg.py``, the hooks in
``capture.py``, every buffer layout in ``exchange.py``, every printed line in ``messages.py``
(docs/algorithm.md §3-§7, docs/design.md). It works with our trainer (through the LBANN hook
names) and from a plain PyTorch loop::

    kfac = KFACCallback(model, damping_act=0.01, damping_err=1.0)
    for x, y in data:
        optimizer.zero_grad()
        logits = model(x)
        kfac.sample_fisher(logits)    # a no-op unless fisher="mc" (docs/algorithm.md §3)
        loss = loss_fn(logits, y)     # mean over the LOCAL mini-batch
        loss.backward()               # (average gradients over ranks here)
        kfac.step()                   # kl_clip > 0: step(learning_rate=optimizer.param_groups[0]["lr"])
        optimizer.step()

With several ranks whose shares of a batch differ (100 samples over 3 ranks: 34, 33, 33),
the loop weights each rank's gradient by its share and tells the callback the counts:
``kfac.step(shares=[34, 33, 33])``; with ``skip_weight_grad`` also ``kfac.expect_shares(...)``
before the forward pass (docs/algorithm.md §6).

Under ``torchrun`` the model may be wrapped in ``DistributedDataParallel``: the callback then
takes its communicator from the process group and the layer names of the wrapped module (no
``module.`` prefix). Gradient accumulation: ``KFACCallback(..., accumulate_steps=k)`` and k
forward/backward passes per ``step()``, each micro-batch's loss weighted by its share of the
rank's samples (1/k for equal ones). Mixed precision: factors are float32 whatever the
forward's dtype; with an fp16 ``GradScaler`` pass ``grad_scaler=scaler`` and call
``scaler.unscale_(optimizer)`` before ``step()`` (docs/algorithm.md §3, §5).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kfac_callback import messages
from kfac_callback.base import Callback, Communicator, SingleProcess, rank0_print
from kfac_callback.blocks import Block, Dampings, LinearBlock, is_preconditionable, make_block, preconditionable_layers
from kfac_callback.blocks.linalg import all_finite
from kfac_callback.config import DAMPING_KEYS, make_config
from kfac_callback.estimation.capture import Capture, Recorder, micro_batches
from kfac_callback.estimation.mc_fisher import MonteCarloFisher
from kfac_callback.estimation.outputs import Bernoulli, Categorical, make_distribution
from kfac_callback.estimation.subsample import factor_batch
from kfac_callback.phases import PhaseClock
from kfac_callback.policy import kl_clip
from kfac_callback.policy.adaptive import AdaptiveRules
from kfac_callback.policy.schedules import DampingSchedule, is_compute_step, is_update_step, update_interval
from kfac_callback.ranks import exchange
from kfac_callback.ranks.assignment import LayerInfo, assign_owners
from kfac_callback.ranks.process_group import ProcessGroupComm, initialised_world
from kfac_callback.skip_weight_grad import SkipWeightGrad

# From this compute interval on, explicit inverses (formed once, then GEMMs) beat Cholesky
# solves at every step (benchmarks/step_time.py).
EXPLICIT_INVERSE_INTERVAL = 5

# Wrappers whose own name would prefix every layer's: DDP and DataParallel (``module``),
# torch.compile (``_orig_mod``). Layers keep the names the user gave them.
WRAPPER_ATTRIBUTES = ("module", "_orig_mod")


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The user's model inside DDP / DataParallel / torch.compile wrappers, and whether it was DDP."""
    ddp = False
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            ddp = True
            model = model.module
        elif isinstance(model, nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model, ddp


def user_name(name: str, known: Collection[str] = ()) -> str:
    """A layer name without a wrapper's prefix: ``module.ip1`` is ``ip1`` (a name in ``known``,
    the model's own layers, stays as it is: a layer may be called ``module`` itself)."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in WRAPPER_ATTRIBUTES and ".".join(parts) not in known:
        parts = parts[1:]
    return ".".join(parts)


@dataclasses.dataclass
class StepRows:
    """One layer's rows of a step: its micro-batches' inputs and output gradients (loss scale
    removed), and whether they are every forward call it had (so the gradient is their gᵀa)."""

    a: list[torch.Tensor]
    g: list[torch.Tensor]
    every_call: bool

    @property
    def n(self) -> int:
        """This rank's samples of the step, over every micro-batch."""
        return sum(x.shape[0] for x in self.a)

    def joined(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batches' rows, one after another."""
        if len(self.a) == 1:
            return self.a[0], self.g[0]
        return torch.cat(self.a), torch.cat(self.g)


class KFACCallback(SkipWeightGrad, MonteCarloFisher, Callback):
    """Kronecker-factored preconditioning of Linear, Conv2d and affine BatchNorm layers.

    Args:
        model: The model, or the model wrapped in ``DistributedDataParallel`` (or
            DataParallel, torch.compile): layers are named as in the user's own model. Its
            supported layers not named in ``disable_layers`` are preconditioned, every other
            parameter is left to the base optimizer.
        comm: The communicator. ``None`` means the initialised ``torch.distributed`` process
            group (a DDP model's own group) if there is one of several ranks, else one process;
            our trainer's ``comm`` replaces it at ``on_setup_end``.
        printer: Where lines go; by default printed on rank 0.
        accumulate_steps: k, the micro-batches (forward and backward passes) of each step
            (our trainer sets it from ``trainer.accumulate_steps``).
        grad_scaler: A ``torch.amp.GradScaler`` scaling the loss (fp16): output gradients are
            divided by its scale, and a step it skips (non-finite scaled gradients) is skipped
            here too, its factors never folded in. Call ``scaler.unscale_(optimizer)`` first.
        seed: Seeds the labels ``fisher=mc`` samples, with the step counter (our trainer
            sets it from its own seed).
        output: The model's output distribution, ``"categorical"`` (softmax cross-entropy,
            the default) or ``"bernoulli"`` (sigmoid cross-entropy summed over the outputs):
            what ``fisher=mc`` samples and whose curvature the adaptive rules use.
        l2_reg: η, the L2 coefficient inside the loss (½η‖θ‖²): its curvature ηI enters the
            adaptive rules' quadratic model (docs/algorithm.md §9).
        **kwargs: ``KFACConfig`` fields (see ``make_config`` for accepted spellings).

    Attributes:
        config: The validated options.
        blocks: ``{layer name: block}`` in model order.
        owners: ``{layer name: owner rank}``.
        steps: s, the number of completed K-FAC steps.
        capture: The hooks, and this step's captures.
        clock: Seconds per phase of ``step()`` (for benchmarks).

    Raises:
        ValueError: For invalid options, unknown names in ``disable_layers`` (listing the
            model's preconditionable layers), a layer K-FAC cannot precondition,
            ``accumulate_steps`` < 1, or ``skip_weight_grad`` on a DDP model.
    """

    def __init__(self, model: nn.Module, comm: Communicator | None = None,
                 printer: Callable[[str], None] | None = None, accumulate_steps: int = 1,
                 grad_scaler: Any = None, seed: int = 0, output: str | Categorical | Bernoulli = "categorical",
                 l2_reg: float = 0.0, **kwargs: Any) -> None:
        self.config = c = make_config(**kwargs)
        self.seed = seed
        self.output = make_distribution(output) if isinstance(output, str) else output
        self.adaptive = AdaptiveRules(c, l2_reg)
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None  # the step's (inputs, targets)
        self.kl_nu = 1.0  # kl_clip: ν of the last step
        inner, ddp = unwrap(model)
        if ddp and c.skip_weight_grad:
            raise ValueError("K-FAC: skip_weight_grad does not work with DistributedDataParallel, which "
                             "all-reduces every weight gradient during backward; turn it off, or average "
                             "the gradients yourself after backward (our trainer does)")
        self.model = inner
        self._comm_given = comm is not None
        if comm is None and initialised_world():
            comm = ProcessGroupComm(getattr(model, "process_group", None) if ddp else None)
        self.comm: Communicator = comm if comm is not None else SingleProcess()
        self.accumulate_steps = accumulate_steps
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0  # steps the grad scaler skipped (non-finite scaled gradients)
        self._printer = printer
        self.say = messages.Printer(lambda line: (self._printer or rank0_print(self.comm))(line))
        layers = preconditionable_layers(inner)
        self.blocks = _build_blocks(inner, [user_name(n, layers) for n in c.disable_layers])
        self.dampings = [DampingSchedule(getattr(c, k), c.damping_warmup_steps) for k in DAMPING_KEYS]
        self.steps = 0
        self.inverse_dtype = getattr(torch, c.inverse_dtype)
        self.owners = self._assign()
        self._need_inverses = True
        self._expected: tuple[int, ...] | None = None  # expect_shares(): the coming step's shares
        self.clock = PhaseClock()
        self.capture = Recorder({name: b.module for name, b in self.blocks.items()}, self._skips_weight_grad,
                                lambda: self.accumulate_steps)

    @property
    def accumulate_steps(self) -> int:
        """k: the micro-batches of every step (docs/algorithm.md §3)."""
        return self._accumulate_steps

    @accumulate_steps.setter
    def accumulate_steps(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"K-FAC: accumulate_steps must be an integer >= 1, got {k!r}")
        if k > 1 and self.config.fisher == "mc":
            raise ValueError(f"K-FAC: kfac.fisher=mc does not support trainer.accumulate_steps={k} "
                             "(accumulate_steps > 1); use kfac.fisher=empirical or accumulate_steps=1")
        if k > 1 and self.config.adapt_learning_rate:
            raise ValueError(f"K-FAC: the adaptive rules do not support trainer.accumulate_steps={k} "
                             "(accumulate_steps > 1); use accumulate_steps=1")
        self._accumulate_steps = k

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any, comm: Communicator | None = None,
                    printer: Callable[[str], None] | None = None) -> KFACCallback:
        """Builds the callback from a ``KFACConfig``, a mapping, or an OmegaConf ``kfac`` node."""
        if dataclasses.is_dataclass(cfg):
            options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        elif isinstance(cfg, Mapping) or hasattr(cfg, "keys"):
            options = {k: cfg[k] for k in cfg.keys()}
        else:
            raise TypeError(f"from_config: expected a KFACConfig or a mapping, got {type(cfg)}")
        return cls(model, comm=comm, printer=printer, **options)

    def _assign(self) -> dict[str, int]:
        infos = [LayerInfo(name, b.kind, tuple(b.factor_dims())) for name, b in self.blocks.items()]
        return assign_owners(infos, self.comm.world_size, self.config.inverse_strategy)

    def remove_hooks(self) -> None:
        """Detaches the callback from the model."""
        self.capture.remove()

    # -- lines -----------------------------------------------------------------------

    def setup_lines(self) -> list[str]:
        """The options line, then one line per preconditioned layer with its owner rank."""
        layers = [(name, b.kind, list(zip(b.factor_names, b.factor_dims(), strict=True)), self.owners[name])
                  for name, b in self.blocks.items()]
        return messages.setup_lines(self.config, layers, self.comm.world_size)

    def damping_line(self, epochs: int) -> str:
        """LBANN's epoch-end line with the current dampings, after ``epochs`` epochs."""
        return messages.damping_line(*self.current_dampings(), epochs)

    # -- trainer hooks ---------------------------------------------------------------

    def on_setup_end(self, trainer: Any) -> None:
        """Adopts the trainer's communicator (if none was given), its micro-batches per step
        and grad scaler, and prints the setup lines."""
        comm = getattr(trainer, "comm", None)
        if not self._comm_given and comm is not None:
            self.comm = comm
            self._comm_given = True
            self.owners = self._assign()
        self.accumulate_steps = getattr(trainer, "accumulate_steps", self.accumulate_steps)
        self.seed = int(getattr(trainer, "seed", self.seed))
        if getattr(trainer, "grad_scaler", None) is not None:
            self.grad_scaler = trainer.grad_scaler
        for line in self.setup_lines():
            self.say(line)

    def on_batch_begin(self, trainer: Any) -> None:
        """Forgets captures of a step the trainer skipped (a non-finite loss): a new step starts.

        The trainer's ``shares`` (per rank, its samples of this step) are expected from here on.
        """
        self.capture.clear()
        self.expect_shares(getattr(trainer, "shares", None))

    def on_forward_prop_end(self, trainer: Any) -> None:
        """Samples the Monte-Carlo Fisher's output gradients from the step's ``trainer.logits``;
        keeps the step's ``trainer.inputs`` and ``trainer.targets`` for the adaptive rules."""
        logits = getattr(trainer, "logits", None)
        if logits is not None:
            self.sample_fisher(logits)
        if self.adaptive.enabled:
            self._batch = (trainer.inputs, trainer.targets)

    def on_backward_prop_end(self, trainer: Any) -> None:
        """Preconditions the (rank-averaged) gradients, with the trainer's ``shares`` of this step
        and (for kl_clip and the adaptive rules) its optimizer's learning rate."""
        needs_lr = self.config.kl_clip > 0 or self.adaptive.enabled
        lr = trainer.optimizer.param_groups[0]["lr"] if needs_lr else None
        batch, self._batch = self._batch, None
        self.step(getattr(trainer, "shares", None), learning_rate=lr, batch=batch)

    def on_epoch_end(self, trainer: Any) -> None:
        """Prints LBANN's damping line; ``trainer.epoch`` is 0-based."""
        self.say(self.damping_line(trainer.epoch + 1))

    # -- schedules -------------------------------------------------------------------

    def current_dampings(self) -> Dampings:
        """The dampings the next step uses; with ``adapt_damping`` tied to λ: √(λ + η) for the
        Kronecker factors, λ + η for BatchNorm's block (docs/algorithm.md §9)."""
        if self.config.adapt_damping:
            gamma = self.adaptive.factor_damping()
            return Dampings(gamma, gamma, gamma * gamma, gamma * gamma)
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
            **({"kfac_kl_nu": self.kl_nu} if c.kl_clip > 0 else {}),
            **(self.adaptive.metrics() if self.adaptive.enabled else {}),
        }

    def is_update_step(self) -> bool:
        """Whether the current step updates the factors."""
        c = self.config
        return is_update_step(self.steps, c.update_interval_init, c.update_interval_target,
                              c.update_interval_steps)

    # -- the step --------------------------------------------------------------------

    def expect_shares(self, shares: Sequence[int] | None) -> None:
        """Announces the coming step's per-rank sample counts, before its forward pass.

        Only ``skip_weight_grad`` needs it: which layers leave their weight GEMM to ``step()``
        is decided during forward, from the global batch N, and every rank must decide alike;
        a rank's own batch size alone does not give N when the shares differ. ``step()`` then
        expects the same ``shares``. ``None``: every rank as many as this one.
        """
        self._expected = self._uneven(shares)

    def _uneven(self, shares: Sequence[int] | None) -> tuple[int, ...] | None:
        """``shares`` as a tuple when they differ between ranks; ``None`` for equal shares,
        which take exactly the code path (and the numbers) of a call without shares."""
        if shares is None:
            return None
        if len(shares) != self.comm.world_size or any(n < 0 for n in shares):
            raise ValueError(f"K-FAC: shares {list(shares)}: need one count >= 0 for each of "
                             f"the {self.comm.world_size} ranks")
        return None if len(set(shares)) == 1 else tuple(int(n) for n in shares)

    def _global_batch(self, local: int, shares: tuple[int, ...] | None) -> int:
        """N, the step's global batch: the sum of the shares, or ``local`` on every rank."""
        return local * self.comm.world_size if shares is None else sum(shares)

    def step(self, shares: Sequence[int] | None = None, learning_rate: float | None = None,
             batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """One K-FAC step; call it after backward (and gradient averaging), before the optimizer.

        Args:
            shares: Per rank, how many samples it had in this step, the same list on every
                rank; ``None`` (or equal counts): every rank as many as this one. With uneven
                shares the gradients must have been combined with weights n_r/N (each rank's
                loss the mean over its own n_r samples); the factors then use the true N and
                each rank's own n_r, and the batch route weights each rank's rows alike
                (docs/algorithm.md §3, §6). A rank with no samples still calls ``step()``.
            learning_rate: The base optimizer's current learning rate; needed (only) with
                ``kl_clip`` > 0, whose ν it enters (docs/algorithm.md §5), and with the
                adaptive rules, which write the update δ as the gradient −δ/lr (§9).
            batch: This rank's ``(inputs, targets)`` of the step: the adaptive rules' curvature
                products and reduction ratio run the model on them (needed only then).

        The gradients must be as backward left them: a fully connected layer's preconditioned
        gradient is built from the batch's inputs and output gradients (``set_batch``), so an
        edit of ``.grad`` in between (clipping, say) would be lost; edit after this step.

        On factor-update steps the captured inputs and output gradients become factors
        (summed over ranks in one collective) and are folded into the running averages; on
        compute steps each owner recomputes its layers' inverses; every step every layer with
        inverses is preconditioned by its owner and the result broadcast. Then the damping
        schedule and the step counter advance.

        Raises:
            ValueError: ``shares`` without one count per rank, or, with ``skip_weight_grad``,
                uneven shares that ``expect_shares`` did not announce before the forward pass;
                ``kl_clip`` without ``learning_rate``; ``fisher=mc`` without ``sample_fisher``.
        """
        clip = self.config.kl_clip
        if clip > 0 and learning_rate is None:
            raise ValueError("K-FAC: kfac.kl_clip > 0 needs the base optimizer's learning rate: "
                             "step(shares, learning_rate=optimizer.param_groups[0]['lr'])")
        if self.adaptive.enabled and (learning_rate is None or batch is None):
            raise ValueError("K-FAC: the adaptive rules need the step's batch and the base optimizer's learning "
                             "rate: step(shares, learning_rate=optimizer.param_groups[0]['lr'], batch=(x, targets))")
        shares = self._uneven(shares)
        expected, self._expected = self._expected, None
        if self.config.skip_weight_grad and shares != expected:
            raise ValueError(f"K-FAC: step(shares={shares}) after expect_shares({expected}): with "
                             "skip_weight_grad, call expect_shares with the step's shares before its forward")
        s = self.steps
        _, calls, skipped = self.capture.take()
        scale = self._loss_scale()
        if scale is None:  # the grad scaler skips this step: so does K-FAC (docs/algorithm.md §5)
            self.skipped_steps += 1
            self.say.once("", "scaler", messages.scaler_skip_line(s, float(self.grad_scaler.get_scale())))
            return
        damping = self.current_dampings()
        gradient = ({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
                    if self.adaptive.enabled else {})
        # K-FAC's own products run in the factors' dtype, also when called inside autocast.
        with torch.autocast(self._device_type(), enabled=False):
            rows = self._step_rows(calls, scale)
            if rows and self.is_update_step():
                # fisher=mc: G and F from the sampled labels' output gradients (docs/algorithm.md §3).
                fisher = self._step_rows(calls, 1.0, True) if self.config.fisher == "mc" else rows
                with self.clock("factors"):
                    self._update_factors(s, fisher, shares)
            if is_compute_step(s, self.config.compute_interval_steps) or self._need_inverses:
                with self.clock("inverses"):
                    self._compute_inverses(s, damping)
            with self.clock("batch_gather"):
                self._offer_batches(rows, shares)
            with self.clock("precondition"):
                # kl_clip needs the plain gradient (or the batch rows standing for it) kept.
                plain_rows = kl_clip.batch_rows(self.blocks, skipped) if clip > 0 else {}
                done = self._precondition_skipped(s, skipped, shares, scale)
                plain = kl_clip.plain_grads(self.blocks, plain_rows) if clip > 0 else {}
                self._precondition(s, done)
                if clip > 0:  # after the broadcast: every rank the same ν (docs/algorithm.md §5)
                    self.kl_nu = kl_clip.clip(self.blocks, plain, plain_rows, learning_rate, clip)
            if self.adaptive.enabled:  # every rank the same gradients here, and the same sums
                with self.clock("adaptive"), self.capture.paused():
                    n = len(batch[0])
                    self.adaptive.update(self.model, gradient, s, batch, self.output, self.comm,
                                         self._global_batch(n, shares), learning_rate)
        for d in self.dampings:
            d.advance()
        self.steps += 1

    def _device_type(self) -> str:
        block = next(iter(self.blocks.values()), None)
        return "cpu" if block is None else block.module.weight.device.type

    def _loss_scale(self) -> float | None:
        """The grad scaler's loss scale (1 without one), or ``None`` when the scaler will skip
        this step because the scaled gradients were not finite.

        Raises:
            ValueError: The scaler has not unscaled the gradients yet (``scaler.unscale_``
                must come before ``step()``, so K-FAC sees the true gradient).
        """
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        states = getattr(scaler, "_per_optimizer_states", None)
        if states is not None:  # what scaler.step() will look at
            from torch.amp.grad_scaler import OptState

            unscaled = [st for st in states.values() if st.get("stage") == OptState.UNSCALED]
            if not unscaled:
                raise ValueError("K-FAC: the grad scaler has not unscaled the gradients: call "
                                 "scaler.unscale_(optimizer) before the K-FAC step")
            if any(float(v.item()) for st in unscaled for v in st["found_inf_per_device"].values()):
                return None
        elif not all(all_finite(p.grad) for p in self.model.parameters() if p.grad is not None):
            return None
        return float(scaler.get_scale())

    def _step_rows(self, calls: dict[str, list[Capture]], scale: float, fisher: bool = False) -> dict[str, StepRows]:
        """Per layer backward reached, its micro-batches' rows (``capture.micro_batches``), the
        output gradients divided by the loss scale; ``fisher``: the sampled loss's (mc)."""
        rows = {}
        for name, layer_calls in calls.items():
            chosen = micro_batches(layer_calls, self.accumulate_steps)
            if not chosen or not all(c.complete for c in chosen):
                continue
            if fisher and any(c.g_fisher is None for c in chosen):
                raise ValueError(f"K-FAC: kfac.fisher=mc: layer {name} has no sampled output gradient; call "
                                 "sample_fisher(logits) after the forward pass, before backward, every step")
            g = [c.g_fisher if fisher else c.g if scale == 1.0 else c.g / scale for c in chosen]
            every = len(chosen) == len(layer_calls) == self.accumulate_steps
            rows[name] = StepRows([c.a for c in chosen], g, every)
        return rows

    def _update_factors(self, s: int, rows: dict[str, StepRows], shares: tuple[int, ...] | None) -> None:
        """Folds this step's factors into the running averages (summed over ranks first).

        Each rank's contribution takes its own n (every micro-batch's rows) and the global N
        (docs/algorithm.md §3); a rank without samples contributes zeros. With
        ``factor_batch_size`` only each rank's first m_r samples count, M in place of N.
        """
        decay, limit, world = self.config.kronecker_decay, self.config.factor_batch_size, self.comm.world_size
        if world == 1:
            # One rank: each layer's batch factors go straight into its running averages.
            for name, block in self.blocks.items():
                r = rows.get(name)
                if r is None:
                    continue
                m, keep = factor_batch(limit, r.n, 1, 0, None)  # a subsample (docs/algorithm.md §3)
                if not block.accumulate(r.a, r.g, r.n if m is None else m, decay, keep):
                    self._warn_bad_factor(s, name)
            return
        if not self.blocks:
            return
        contributions = []
        for name, block in self.blocks.items():
            r = rows.get(name)
            if r is None:
                contributions.append(None)
                continue
            m, keep = factor_batch(limit, r.n, world, self.comm.rank, shares)
            contributions.append(block.contributions(r.a, r.g, self._global_batch(r.n, shares) if m is None else m,
                                                     keep))
        dtype = exchange.widest_dtype([b.module.weight for b in self.blocks.values()], torch.float32)
        device = next(iter(self.blocks.values())).module.weight.device
        with self.clock("factor_allreduce"):
            summed = exchange.sum_factors(self.comm, contributions,
                                          [b.factor_dims() for b in self.blocks.values()], dtype, device)
        for (name, block), mats in zip(self.blocks.items(), summed, strict=True):
            # None: some rank saw no forward/backward of this layer this step.
            if mats is not None and not block.update_factors(mats, decay):
                self._warn_bad_factor(s, name)

    def _warn_bad_factor(self, s: int, name: str) -> None:
        self.say.once(name, "factor", messages.layer_note(s, name, messages.BAD_FACTOR))

    def _offer_batches(self, rows: dict[str, StepRows], shares: tuple[int, ...] | None) -> None:
        """Lets fully connected layers precondition through this step's batch (cheaper).

        A layer qualifies when each of its forward calls since the last step was one
        micro-batch (no weight sharing), so that its gradient is exactly ``gᵀa`` of the step's
        rows (every micro-batch's, joined), and when that route costs fewer flops. With
        several ranks the combined gradient is ``Σ_r (n_r/N) g_rᵀ a_r`` (``(1/R) Σ_r g_rᵀ a_r``
        for equal shares): the ranks' ``a`` and ``g`` rows are gathered in one collective,
        each rank's ``g`` weighted by n_r/N, far fewer numbers than the gradient itself for the
        MLP (N·(in+out) vs in·out) (docs/algorithm.md §5, §6). A layer takes the batch route
        only when every rank could offer it, so all decide alike.
        """
        world = self.comm.world_size
        linear = {n: b for n, b in self.blocks.items() if isinstance(b, LinearBlock)}
        usable = {}
        for name, block in linear.items():
            block.set_batch(None, None)
            r = rows.get(name)
            usable[name] = (r is not None and r.every_call and all(x.dim() == 2 for x in r.a)
                            and block.batch_route_cheaper(self._global_batch(r.n, shares)))
        joined = {n: rows[n].joined() for n in linear if usable[n]}
        if world == 1 or not joined:
            # Several ranks with none present: no captures on any rank (the schedule is the same everywhere).
            for name, (a, g) in joined.items():
                linear[name].set_batch(a, g)
            return
        first = next(iter(joined.values()))[0]
        counts = [first.shape[0]] * world if shares is None else shares
        mine = counts[self.comm.rank]
        # Uneven shares: this rank's g rows carry its weight n_r/N into the gathered batch;
        # equal ones are divided by R after the gather, as they always were.
        weight = None if shares is None else mine / sum(shares)
        offered = [joined.get(n) if usable[n] and joined[n][0].shape[0] == mine else None for n in linear]
        offered = [None if pair is None else (pair[0], pair[1] if weight is None else pair[1] * weight)
                   for pair in offered]
        dims = [(b.in_features(), b.out_features()) for b in linear.values()]
        # At least float32 (a bf16 capture under autocast), as the factors: MPI has no bf16.
        dtype = torch.promote_types(first.dtype, torch.float32)
        gathered = exchange.gather_rows(self.comm, offered, counts, dims, dtype, first.device)
        for block, batch in zip(linear.values(), gathered, strict=True):
            if batch is not None:
                block.set_batch(batch[0], batch[1] / world if weight is None else batch[1])

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
                self.say(messages.inverse_time_line(s, name, elapsed, self.comm.rank))
            for note in block.inverse_notes:
                self.say.once(name, "inverse " + note.split(":")[0], messages.layer_note(s, name, note))
            if not ok and block.has_factors:
                self.say.once(name, "plain", messages.layer_note(s, name, messages.NO_INVERSE))
            if c.print_matrix_summary or c.print_matrix:
                for label in (*block.factor_names, *(f"{f}_inv" for f in block.factor_names)):
                    mat = getattr(block, label, None)
                    if mat is not None:
                        for line in messages.matrix_lines(s, name, label, mat, c.print_matrix_summary, c.print_matrix):
                            self.say(line)
        self._need_inverses = False

    def _say_zeroed(self, s: int, name: str) -> None:
        self.say(messages.layer_note(s, name, messages.ZEROED))

    def _warn_plain_kept(self, s: int, name: str) -> None:
        self.say.once(name, "precond", messages.layer_note(s, name, messages.PLAIN_KEPT))

    def _precondition(self, s: int, done: set[str] = frozenset()) -> None:
        # Gradients are identical on all ranks here, so every rank takes the same decisions.
        for name, block in self.blocks.items():
            if name in done:
                continue
            if not block.grads_finite():
                self._say_zeroed(s, name)
                block.zero_grads()
                if isinstance(block, LinearBlock):
                    block.set_batch(None, None)  # the batch route would bring the gradient back
        f = self.config.learning_rate_factor
        for name, block in self.blocks.items():
            if name in done:
                continue
            if self.owners[name] == self.comm.rank and block.has_inverses and not block.precondition(f):
                self._warn_plain_kept(s, name)
        if self.comm.world_size > 1:
            with self.clock("exchange"):
                owned = [[g for name, b in self.blocks.items() if self.owners[name] == owner
                          for g in (b.grads() or [])] for owner in range(self.comm.world_size)]
                exchange.broadcast_owned(self.comm, owned)

    # -- checkpoints -----------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """Saved under the class name, as checkpoints always have been."""
        return "KFACCallback"

    def state_dict(self) -> dict[str, Any]:
        """Running averages, update counts, dampings, the step counter and the inverses.

        With several ranks this is a collective that every rank must call: a layer's inverses
        live on its owner only, so they are gathered here. A resumed run (with any number of
        ranks) then preconditions with exactly the same inverses until the next compute step.
        """
        inverses = {name: b.export_inverses() if self.owners[name] == self.comm.rank else {}
                    for name, b in self.blocks.items()}
        if self.comm.world_size > 1 and self.blocks:
            shapes = {name: [(f"{f}.{kind}", n) for f, n in zip(b.factor_names, b.factor_dims(), strict=True)
                             for kind in ("chol", "inverse")] for name, b in self.blocks.items()}
            device = next(iter(self.blocks.values())).module.weight.device
            inverses = exchange.gather_inverses(self.comm, inverses, self.owners, shapes, device)
        return {
            "steps": self.steps,
            "dampings": [d.value for d in self.dampings],
            "factors": {name: [None if m is None else m.detach().clone() for m in b.factors()]
                        for name, b in self.blocks.items()},
            "updates": {name: b.updates for name, b in self.blocks.items()},
            "inverses": inverses,
            "need_inverses": self._need_inverses,
            **({"adaptive": self.adaptive.state_dict()} if self.adaptive.enabled else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``, the inverses too (each rank keeps those it owns now).

        A state without inverses (an older one) has them recomputed at the next step.

        Layer names saved with a wrapper's prefix (``module.ip1``, by code that named DDP's
        layers) are read as the user's (``ip1``).

        Raises:
            ValueError: If the state's layers differ from this callback's.
        """
        state = {**state, **{key: {user_name(k, self.blocks): v for k, v in state[key].items()}
                             for key in ("factors", "updates", "inverses") if state.get(key) is not None}}
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
        self.capture.clear()
        self._need_inverses = inverses is None or bool(state.get("need_inverses", False))
        if self.adaptive.enabled:
            self.adaptive.load_state_dict(state.get("adaptive"))


def _build_blocks(model: nn.Module, disable: list[str]) -> dict[str, Block]:
    candidates = preconditionable_layers(model)
    unknown = [name for name in disable if name not in candidates]
    if unknown:
        raise ValueError(f"kfac.disable_layers: unknown layer(s) {unknown}; the model's "
                         f"preconditionable layers are {candidates}")
    return {name: make_block(name, module) for name, module in model.named_modules()
            if name not in disable and is_preconditionable(module)}
