"""Every line the K-FAC callback prints: LBANN's, and its own notes and warnings (docs/algorithm.md §7)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kfac_callback.config import DAMPING_KEYS, KFACConfig

PREFIX = "K-FAC callback:"


def fmt(x: float) -> str:
    """A number as LBANN prints it (``%g``)."""
    return f"{x:g}"


def square(shape: tuple[int, ...]) -> str:
    """A factor's shape, ``n x n``, or ``n (diagonal)`` for one held as its diagonal."""
    return f"{shape[0]}x{shape[0]}" if len(shape) == 2 else f"{shape[0]} (diagonal)"


def setup_lines(c: KFACConfig, layers: list[tuple[str, str, list[tuple[str, tuple[int, ...]]], int]],
                ranks: int) -> list[str]:
    """The options line, then per layer ``(name, kind, [(factor, shape)], owner)`` its line."""
    damp = " ".join(f"{k}={','.join(fmt(v) for v in getattr(c, k))}" for k in DAMPING_KEYS)
    lines = [
        f"{PREFIX} {damp} damping_warmup_steps={c.damping_warmup_steps} "
        f"update_interval={c.update_interval_init}->{c.update_interval_target} over "
        f"{c.update_interval_steps} steps compute_interval_steps={c.compute_interval_steps} "
        f"kronecker_decay={fmt(c.kronecker_decay)} use_pi={int(c.use_pi)} "
        f"use_eigen={int(c.use_eigen)} inverse_strategy={c.inverse_strategy} "
        f"inverse_dtype={c.inverse_dtype} learning_rate_factor={fmt(c.learning_rate_factor)} "
        f"disable_layers={','.join(c.disable_layers) or 'none'} "
        f"skip_weight_grad={int(c.skip_weight_grad)}{levers(c)} ranks={ranks}"]
    for name, kind, factors, owner in layers:
        shapes = ", ".join(f"{f} {square(n)}" for f, n in factors)
        lines.append(f"{PREFIX} layer {name} ({kind}): {shapes}, owner rank {owner}")
    return lines


def coverage_lines(swapped: list[str], uncovered: list[tuple[str, str]]) -> list[str]:
    """What K-FAC does with the layers it swapped, and (one line per type) those it leaves to
    the base optimizer (docs/algorithm.md §3, "Layers")."""
    lines = [f"{PREFIX} layer {name} (MultiheadAttention): runs as kfac_callback.MultiheadAttention (same "
             "parameters, same outputs) so that K-FAC sees its projections" for name in swapped]
    by_type: dict[str, list[str]] = {}
    for name, kind in uncovered:
        by_type.setdefault(kind, []).append(name)
    for kind, names in by_type.items():
        why = ("its projections run functionally (kfac.swap_attention=true makes them K-FAC layers)"
               if "MultiheadAttention" in kind or names[0].endswith("out_proj") else "no K-FAC block for this type")
        lines.append(f"{PREFIX} not preconditioned, left to the base optimizer ({why}): {kind} {', '.join(names)}")
    return lines


def silent_line(s: int, names: list[str]) -> str:
    """Preconditioned layers whose hooks did not fire in the first step that captured anything."""
    return (f"{PREFIX} step {s}: layer(s) {', '.join(names)}: hooks did not fire (called functionally, or "
            "unused); left to the base optimizer until they do")


def batchless_line(s: int, name: str, shape: tuple[int, ...]) -> str:
    """A layer whose input has no batch dimension (docs/algorithm.md §3, "Layers")."""
    return (f"{PREFIX} step {s}: layer {name}: its input {list(shape)} has no batch dimension (the other layers' "
            "first dimension), so no per-sample factors; left to the base optimizer")


def levers(c: KFACConfig) -> str:
    """The options of ours that are not at their defaults (defaults print LBANN's line as it was)."""
    changed = [(k, v) for k, v, off in (("factor_batch_size", c.factor_batch_size, 0), ("fisher", c.fisher, "empirical"),
                                         ("kl_clip", c.kl_clip, 0.0),
                                         ("weight_sharing", c.weight_sharing, "expand"),
                                         ("swap_attention", int(c.swap_attention), 1)) if v != off]
    if c.adapt_learning_rate:  # the adaptive rules (docs/algorithm.md §9)
        rules = "+".join(r for r, on in (("lr", True), ("momentum", c.adapt_momentum), ("damping", c.adapt_damping)) if on)
        changed += [("adaptive", rules), ("initial_damping", float(c.initial_damping))]
        if c.calibrate_damping:
            changed.append(("calibrate_damping", 1))
        if c.adapt_damping:
            changed += [("damping_range", f"{fmt(c.min_damping)}..{fmt(c.max_damping)}"),
                        ("damping_adaptation", f"{c.damping_adaptation_interval}x{fmt(c.damping_adaptation_decay)}")]
        if c.adaptive_batch_size:
            changed.append(("adaptive_batch_size", c.adaptive_batch_size))
    return "".join(f" {k}={fmt(v) if isinstance(v, float) else v}" for k, v in changed)


def damping_line(act: float, err: float, bn_act: float, bn_err: float, epochs: int) -> str:
    """LBANN's epoch-end line with the current dampings."""
    return (f"{PREFIX} changing damping value to {fmt(act)} (act), {fmt(err)} (err), "
            f"{fmt(bn_act)} (bn_act), {fmt(bn_err)} (bn_err) at {epochs} epochs")


def inverse_time_line(s: int, name: str, seconds: float, rank: int) -> str:
    return f"{PREFIX} step {s}: inverses of {name} took {seconds * 1e3:.3f} ms on rank {rank}"


def layer_note(s: int, name: str, note: str) -> str:
    """A note of one step about one layer."""
    return f"{PREFIX} step {s}: layer {name}: {note}"


def scaler_skip_line(s: int, scale: float) -> str:
    """The grad scaler found non-finite scaled gradients: this step leaves K-FAC untouched."""
    return (f"{PREFIX} step {s}: the grad scaler skips this step (non-finite gradients at loss scale "
            f"{fmt(scale)}); factors, inverses and schedules untouched (said once)")


NO_INVERSE = "no usable inverse; the layer keeps its plain gradient"
ZEROED = "non-finite gradient; zeroed for this step"
PLAIN_KEPT = "preconditioned gradient not finite; plain gradient kept"
BAD_FACTOR = "non-finite Kronecker factor skipped (running average kept)"


def matrix_lines(s: int, name: str, label: str, mat: torch.Tensor, summary: bool, full: bool) -> list[str]:
    """``--print-matrix-summary`` and ``--print-matrix`` lines of one factor or inverse."""
    lines = []
    if summary:
        lines.append(layer_note(s, name, f"{label} {square(tuple(mat.shape))} norm {float(mat.norm()):g} "
                                          f"min {float(mat.min()):g} max {float(mat.max()):g} "
                                          f"trace {float(mat.trace()):g}"))
    if full:
        lines.append(layer_note(s, name, f"{label} =\n{mat}"))
    return lines


class Printer:
    """Prints lines, and some of them once per layer and kind of event.

    Args:
        write: Where lines go.
    """

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self._warned: set[tuple[str, str]] = set()

    def __call__(self, line: str) -> None:
        self.write(line)

    def once(self, layer: str, what: str, line: str) -> None:
        """Prints ``line`` the first time ``(layer, what)`` happens."""
        if (layer, what) not in self._warned:
            self._warned.add((layer, what))
            self.write(line)


class LayerNotes:
    """The per-layer notes of a step's phases, through a ``Printer`` (docs/algorithm.md §7).

    Args:
        say: The callback's printer.
    """

    def __init__(self, say: Printer) -> None:
        self.say = say

    def zeroed(self, s: int, name: str) -> None:
        """A non-finite gradient was zeroed (said every time)."""
        self.say(layer_note(s, name, ZEROED))

    def plain_kept(self, s: int, name: str) -> None:
        """The plain gradient was kept where preconditioning failed (said once per layer)."""
        self.say.once(name, "precond", layer_note(s, name, PLAIN_KEPT))

    def bad_factor(self, s: int, name: str) -> None:
        """A non-finite factor was left out of the running average (said once per layer)."""
        self.say.once(name, "factor", layer_note(s, name, BAD_FACTOR))
