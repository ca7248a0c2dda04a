"""What the callback sees of each step: layer inputs and output gradients, caught by hooks.

A forward hook on every preconditioned layer keeps the layer's input ``a``; a tensor hook on its
output keeps the gradient ``g`` of the loss with respect to that output when backward reaches
it (a tensor hook rather than a module backward hook: it tolerates in-place ops such as
``ReLU(inplace=True)`` after the layer). With ``skip_weight_grad`` a fully connected layer's
output is replaced by ``WithoutWeightGrad``, whose backward computes only the input gradient;
the callback then writes the weight gradient itself (docs/algorithm.md §5).

Gradient accumulation (docs/algorithm.md §3): every forward call since the last step is kept,
in order, so that k micro-batches give the factors and the batch route of their k·b rows;
``micro_batches`` says which calls are the step's micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge


@dataclass
class Capture:
    """One layer's capture since the last step.

    Attributes:
        a: The input of the layer's latest forward call (detached).
        calls: How many forward calls the layer had since the last step (1 unless shared or
            accumulated: only then is the gradient exactly ``gᵀa`` of this batch).
        g: The gradient of the loss with respect to that call's output, once backward ran.
        edge: The output's gradient edge (kfac.fisher=mc differentiates a sampled loss with
            respect to it; taken at forward, so later in-place ops do not move it).
        g_fisher: The sampled loss's gradient there (``KFACCallback.sample_fisher``).
    """

    a: torch.Tensor
    calls: int
    g: torch.Tensor | None = None
    edge: Any = None
    g_fisher: torch.Tensor | None = None

    @property
    def complete(self) -> bool:
        """Whether backward reached the layer (``g`` is known)."""
        return self.g is not None


def micro_batches(calls: list[Capture], k: int) -> list[Capture]:
    """The calls of one step that stand for its micro-batches, given k micro-batches a step.

    k calls: one per micro-batch, all of them. c·k calls (a layer used c times in each forward,
    shared weights): the last call of each micro-batch, as one micro-batch has always taken its
    last call. Any other count: the last call alone.
    """
    if len(calls) == k:
        return list(calls)
    if k >= 1 and calls and len(calls) % k == 0:
        c = len(calls) // k
        return list(calls[c - 1::c])
    return calls[-1:]


class Recorder:
    """Hooks on the preconditioned layers; holds the step's captures until the callback takes them.

    Args:
        modules: ``{layer name: module}``.
        skips_weight_grad: ``(name, input) -> bool``: whether this forward call may leave the
            weight gradient to the callback (skip_weight_grad); asked at a layer's first call
            of a step, and that answer holds for its next ``micro_batches() - 1`` calls.
        micro_batches: ``() -> k``, the micro-batches of a step (gradient accumulation).

    Attributes:
        captures: ``{layer name: Capture}``: each layer's latest training-mode forward call
            since the last step.
        calls: ``{layer name: [Capture]}``: every such call, in order.
        skipped: ``{layer name: [Capture]}``: the calls whose weight gradient autograd skips.
    """

    def __init__(self, modules: dict[str, nn.Module],
                 skips_weight_grad: Callable[[str, torch.Tensor], bool],
                 micro_batches: Callable[[], int] = lambda: 1) -> None:
        self.captures: dict[str, Capture] = {}
        self.calls: dict[str, list[Capture]] = {}
        self.skipped: dict[str, list[Capture]] = {}
        self._skips_weight_grad = skips_weight_grad
        self._micro_batches = micro_batches
        self._skip: dict[str, bool] = {}
        self._paused = False
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def take(self) -> tuple[dict[str, Capture], dict[str, list[Capture]], dict[str, list[Capture]]]:
        """The latest captures, every call and the skipped calls so far; the recorder starts afresh.

        Backward has run by now, so the gradient edges are dropped: an edge's autograd node holds
        the hook that holds the capture, a cycle through C++ that Python's collector cannot
        break, and it would keep every step's graph and activations alive.
        """
        taken = self.captures, self.calls, self.skipped
        self.clear()
        return taken

    def clear(self) -> None:
        """Forgets every capture (a step the trainer skipped, a restored state)."""
        for calls in self.calls.values():
            for capture in calls:
                capture.edge = None
        self.captures, self.calls, self.skipped, self._skip = {}, {}, {}, {}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Captures nothing meanwhile (the adaptive rules' extra forward passes)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def remove(self) -> None:
        """Detaches the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            # Test passes and no-grad evaluation capture nothing. Every training step does:
            # keeping references costs nothing, factors are computed only on update steps,
            # and the captures let fully connected layers precondition through the batch.
            if self._paused or not (module.training and torch.is_grad_enabled()):
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad or not args:
                return None
            previous = self.captures.get(name)
            capture = Capture(args[0].detach(), 1 + (previous.calls if previous else 0))
            self.captures[name] = capture
            self.calls.setdefault(name, []).append(capture)
            if previous is None:
                self._skip[name] = self._skips_weight_grad(name, args[0])
            # One decision per step: micro-batch m of k skips as the first did; a further call
            # (a shared layer) goes the ordinary way, and step() rebuilds what it needs.
            if self._skip.get(name) and capture.calls <= self._micro_batches():
                self.skipped.setdefault(name, []).append(capture)
                # A new output whose backward gives the input its gradient and hands the output
                # gradient to the capture; the graph of `output`, with its weight GEMM, is dropped.
                out = WithoutWeightGrad.apply(args[0], module.weight, _Carry(output.detach(), capture))
                capture.edge = get_gradient_edge(out)
                return out

            def grad_hook(grad: torch.Tensor) -> None:
                capture.g = grad.detach()

            output.register_hook(grad_hook)
            capture.edge = get_gradient_edge(output)
            return None

        return hook


class _Carry:
    """An already computed output and its capture, passed through ``WithoutWeightGrad``
    untouched by autograd (an output that is also an input would become a view, which
    in-place ops such as ReLU(inplace=True) after the layer may not modify)."""

    def __init__(self, output: torch.Tensor, capture: Capture) -> None:
        self.output, self.capture = output, capture


class WithoutWeightGrad(torch.autograd.Function):
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
        ctx.capture.g = grad.detach()
        (weight,) = ctx.saved_tensors
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None
