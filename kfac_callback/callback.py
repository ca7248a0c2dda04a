"""The K-FAC callback: when each part of a K-FAC step runs, and on which rank.

The step loop calls collaborators with explicit inputs and outputs: the blocks and their math
(``blocks/``), the hooks, rows and Fisher sampler (``estimation/``), the phases of a step
(``step/``), the schedules, KL clip and adaptive rules (``policy/``), and what ranks exchange
(``ranks/``); every line it prints is in ``messages.py`` (docs/algorithm.md, docs/design.md).
It works with our trainer (through the LBANN hook names) and from a plain PyTorch loop::

    kfac = KFACCallback(model, damping_act=0.01, damping_err=1.0)
    for x, y in data:
        optimizer.zero_grad()
        logits = model(x)
        kfac.sample_fisher(logits)    # a no-op unless fisher="mc" (docs/algorithm.md §3)
        loss = loss_fn(logits, y)     # mean over the LOCAL mini-batch
        loss.backward()               # (average gradients over ranks here)
        kfac.step()                   # kl_clip > 0: step(learning_rate=optimizer.param_groups[0]["lr"])
        optimizer.step()

Uneven shares over ranks (``step(shares=...)``, ``expect_shares``), DDP under ``torchrun``,
gradient accumulation, mixed precision and the adaptive rules: docs/usage.md, docs/algorithm.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kfac_callback import messages
from kfac_callback.base import Callback, Communicator, SingleProcess, rank0_print
from kfac_callback.blocks import Dampings, build_blocks, preconditionable_layers, uncovered_layers
from kfac_callback.config import check_accumulate_steps, make_config, options_of
from kfac_callback.estimation.capture import Recorder
from kfac_callback.estimation.mc_fisher import sample_output_gradients
from kfac_callback.estimation.outputs import Bernoulli, Categorical, make_distribution
from kfac_callback.estimation.rows import batchless, step_rows
from kfac_callback.layers import swap_attention
from kfac_callback.phases import PhaseClock
from kfac_callback.policy.adaptive import AdaptiveRules
from kfac_callback.policy.kl_clip import KLClip
from kfac_callback.policy.schedules import StepSchedule
from kfac_callback.ranks.assignment import LayerInfo, assign_owners
from kfac_callback.ranks.process_group import ProcessGroupComm, initialised_world
from kfac_callback.ranks.shares import global_batch, uneven
from kfac_callback.state import export_state, import_state
from kfac_callback.step import factors, precondition, skip_weight_grad
from kfac_callback.step.loss_scale import loss_scale
from kfac_callback.wrappers import unwrap, user_name


class KFACCallback(Callback):
    """Kronecker-factored preconditioning of the layer types of docs/algorithm.md §3 ("Layers").

    Args:
        model: The model, or the model wrapped in ``DistributedDataParallel`` (or
            DataParallel, torch.compile): layers are named as in the user's own model. Its
            supported layers not named in ``disable_layers`` are preconditioned, every other
            parameter is left to the base optimizer.
        comm: The communicator. ``None`` means the initialised ``torch.distributed`` process
            group (a DDP model's own group) if there is one of several ranks, else one process;
            our trainer's ``comm`` replaces it at ``on_setup_end``.
        printer: Where lines go; by default printed on rank 0.
        accumulate_steps: k, the micro-batches (forward and backward passes) of each step.
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
            model's preconditionable layers), ``accumulate_steps`` < 1, or
            ``skip_weight_grad`` on a DDP model.
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
        self.kl = KLClip(c.kl_clip)
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
        self.notes = messages.LayerNotes(self.say)
        self.swapped = swap_attention(inner) if c.swap_attention else []  # docs/algorithm.md §3, "Attention"
        layers = preconditionable_layers(inner)
        self.blocks = build_blocks(inner, [user_name(n, layers) for n in c.disable_layers], c.weight_sharing)
        self._fired = False  # a step captured something: the layers it missed were named
        self.schedule = StepSchedule(c, self.adaptive)
        self.dampings = self.schedule.dampings
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
        check_accumulate_steps(k, self.config)
        self._accumulate_steps = k

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any, comm: Communicator | None = None,
                    printer: Callable[[str], None] | None = None) -> KFACCallback:
        """Builds the callback from a ``KFACConfig``, a mapping, or an OmegaConf ``kfac`` node."""
        return cls(model, comm=comm, printer=printer, **options_of(cfg))

    def _assign(self) -> dict[str, int]:
        # A diagonal factor's inverse is O(n): only square ones weigh in the balance.
        infos = [LayerInfo(name, b.kind, tuple(s[0] for s in b.factor_shapes() if len(s) == 2))
                 for name, b in self.blocks.items()]
        return assign_owners(infos, self.comm.world_size, self.config.inverse_strategy)

    def remove_hooks(self) -> None:
        self.capture.remove()  # detaches the callback from the model

    kl_nu = property(lambda self: self.kl.nu, doc="kl_clip: ν of the last step (1 until one is clipped).")

    # -- lines -----------------------------------------------------------------------

    def setup_lines(self) -> list[str]:
        """The options line, then one line per preconditioned layer with its owner rank."""
        layers = [(name, b.kind, list(zip(b.factor_names, b.factor_shapes(), strict=True)), self.owners[name])
                  for name, b in self.blocks.items()]
        return (messages.setup_lines(self.config, layers, self.comm.world_size)
                + messages.coverage_lines(self.swapped, uncovered_layers(self.model, self.blocks)))

    def damping_line(self, epochs: int) -> str:
        """LBANN's epoch-end line with the current dampings, after ``epochs`` epochs."""
        return messages.damping_line(*self.current_dampings(), epochs)

    # -- trainer hooks ---------------------------------------------------------------

    def on_setup_end(self, trainer: Any) -> None:
        """Adopts the trainer's communicator, micro-batches and grad scaler; prints the setup lines."""
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

    def current_dampings(self) -> Dampings:
        """The dampings the next step uses (``StepSchedule.current_dampings``, docs/algorithm.md §9)."""
        return self.schedule.current_dampings()

    def metrics(self) -> dict[str, float]:
        """The current dampings and factor-update interval k(s), for the per-epoch metrics record."""
        d = self.current_dampings()
        return {
            "kfac_damping_act": d.act,
            "kfac_damping_err": d.err,
            "kfac_damping_bn_act": d.bn_act,
            "kfac_damping_bn_err": d.bn_err,
            "kfac_update_interval": self.schedule.update_interval(self.steps),
            **({"kfac_kl_nu": self.kl.nu} if self.kl.enabled else {}),
            **(self.adaptive.metrics() if self.adaptive.enabled else {}),
        }

    def is_update_step(self) -> bool:
        """Whether the current step updates the factors."""
        return self.schedule.updates_factors(self.steps)

    # -- the step --------------------------------------------------------------------

    def expect_shares(self, shares: Sequence[int] | None) -> None:
        """Announces the coming step's per-rank sample counts, before its forward pass.

        Only ``skip_weight_grad`` needs it: which layers leave their weight GEMM to ``step()``
        is decided during forward, from the global batch N, and every rank must decide alike;
        a rank's own batch size alone does not give N when the shares differ. ``step()`` then
        expects the same ``shares``. ``None``: every rank as many as this one.
        """
        self._expected = uneven(shares, self.comm.world_size)

    def sample_fisher(self, logits: torch.Tensor) -> None:
        """kfac.fisher=mc: the output gradients of a loss with labels sampled from the model.

        Call it on every step after the forward pass, before ``loss.backward()``, with the
        step's logits (n × classes for softmax cross-entropy, n × outputs for the Bernoulli
        output; the callback's ``output``). It does nothing unless ``fisher=mc`` and this step
        updates the factors; then it draws one target per sample from the model's prediction and
        differentiates that loss's mean over the rank's rows with respect to the layers'
        outputs (one extra backward, ``.grad`` untouched); the coming ``step()`` builds G and F
        from these gradients, the gradient and the batch route keep the true labels'
        (docs/algorithm.md §3, "Fisher"). With uneven shares call
        ``expect_shares`` first: the labels are drawn over the global batch.
        """
        if self.config.fisher != "mc" or not self.is_update_step():
            return
        calls = [c for layer in self.capture.calls.values() for c in layer if c.g_fisher is None]
        if calls:
            sample_output_gradients(calls, logits, self.output, self.seed, self.steps, self._expected,
                                    self.comm.rank, self.comm.world_size)

    def _skips_weight_grad(self, name: str, a: torch.Tensor) -> bool:
        """The recorder asks at each forward call: may this layer leave its weight GEMM to
        ``step()`` (skip_weight_grad; N from k micro-batches of these rows, or the announced shares)."""
        n = global_batch(a.shape[0] * self.accumulate_steps, self._expected, self.comm.world_size)
        return self.config.skip_weight_grad and skip_weight_grad.skips(self.blocks[name], a, n)

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
        if self.kl.enabled and learning_rate is None:
            raise ValueError("K-FAC: kfac.kl_clip > 0 needs the base optimizer's learning rate: "
                             "step(shares, learning_rate=optimizer.param_groups[0]['lr'])")
        if self.adaptive.enabled and (learning_rate is None or batch is None):
            raise ValueError("K-FAC: the adaptive rules need the step's batch and the base optimizer's learning "
                             "rate: step(shares, learning_rate=optimizer.param_groups[0]['lr'], batch=(x, targets))")
        world = self.comm.world_size
        shares = uneven(shares, world)
        expected, self._expected = self._expected, None
        if self.config.skip_weight_grad and shares != expected:
            raise ValueError(f"K-FAC: step(shares={shares}) after expect_shares({expected}): with "
                             "skip_weight_grad, call expect_shares with the step's shares before its forward")
        s, c, blocks, owners, notes = self.steps, self.config, self.blocks, self.owners, self.notes
        _, calls, skipped = self.capture.take()
        if calls and not self._fired and (silent := [name for name in blocks if name not in calls]):
            self.say(messages.silent_line(s, silent))  # never silently wrong: hooks that did not fire
        self._fired = self._fired or bool(calls)
        for name in batchless(calls):  # no per-sample rows: left to the base optimizer
            self.say.once(name, "batchless", messages.batchless_line(s, name, tuple(calls.pop(name)[0].a.shape)))
        scale = loss_scale(self.grad_scaler, self.model)
        if scale is None:  # the grad scaler skips this step: so does K-FAC (docs/algorithm.md §5)
            self.skipped_steps += 1
            self.say.once("", "scaler", messages.scaler_skip_line(s, float(self.grad_scaler.get_scale())))
            return
        gradient = ({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
                    if self.adaptive.enabled else {})
        if not self.adaptive.calibrated:  # λ₀ from the first gradient's curvature, before the first inverses
            with torch.autocast(self._device_type(), enabled=False), self.capture.paused():
                self.adaptive.calibrate(self.model, gradient, batch, self.output, self.comm,
                                        global_batch(len(batch[0]), shares, world), shares)
        damping = self.current_dampings()
        # K-FAC's own products run in the factors' dtype, also when called inside autocast.
        with torch.autocast(self._device_type(), enabled=False):
            rows = step_rows(calls, self.accumulate_steps, scale)
            if rows and self.is_update_step():
                # fisher=mc: G and F from the sampled labels' output gradients (docs/algorithm.md §3).
                fisher = step_rows(calls, self.accumulate_steps, 1.0, True) if c.fisher == "mc" else rows
                with self.clock("factors"):
                    factors.update_factors(blocks, fisher, shares, self.comm, c.kronecker_decay, c.factor_batch_size,
                                           s, notes, self.clock)
            if self.schedule.computes_inverses(s) or self._need_inverses:
                with self.clock("inverses"):
                    precondition.compute_inverses(blocks, owners, self.comm.rank, s, damping, c, self.inverse_dtype,
                                                  self.say)
                    self._need_inverses = False
            with self.clock("batch_gather"):
                factors.offer_batches(blocks, rows, shares, self.comm)
            with self.clock("precondition"):
                # kl_clip needs the plain gradient (or the batch rows standing for it) kept.
                plain_rows = self.kl.keep_rows(blocks, skipped)
                done = skip_weight_grad.precondition_skipped(blocks, owners, self.comm, skipped, shares, s,
                                                             c.learning_rate_factor, notes, scale)
                plain = self.kl.keep_plain(blocks, plain_rows)
                precondition.precondition(blocks, owners, self.comm, s, c.learning_rate_factor, notes, self.clock, done)
                # After the broadcast: every rank the same ν (docs/algorithm.md §5).
                self.kl.apply(blocks, plain, plain_rows, learning_rate)
            if self.adaptive.enabled:  # every rank the same gradients here, and the same sums
                with self.clock("adaptive"), self.capture.paused():
                    n = global_batch(len(batch[0]), shares, world)
                    self.adaptive.update(self.model, gradient, s, batch, self.output, self.comm, n, learning_rate,
                                         shares)
        self.schedule.advance()
        self.steps += 1

    def _device_type(self) -> str:
        block = next(iter(self.blocks.values()), None)
        return "cpu" if block is None else block.module.weight.device.type

    # -- checkpoints -----------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """Saved under the class name, as checkpoints always have been."""
        return "KFACCallback"

    def state_dict(self) -> dict[str, Any]:
        """Running averages, update counts, dampings, the step counter and the inverses
        (``state.export_state``; with several ranks a collective every rank must call)."""
        return export_state(self.blocks, self.owners, self.comm, self.steps, self.dampings, self._need_inverses,
                            self.adaptive)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``, the inverses too (each rank keeps those it owns now;
        ``state.import_state``). A state without inverses (an older one) has them recomputed at
        the next step.

        Raises:
            ValueError: If the state's layers differ from this callback's.
        """
        self.steps, self._need_inverses = import_state(state, self.blocks, self.owners, self.comm.rank,
                                                       self.dampings, self.adaptive)
        self.capture.clear()
