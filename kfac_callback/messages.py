"""Every line the K-FAC callback prints: LBANN's, and its own notes and warnings (docs/algorithm.md §7)."""

from __future__ import annotations

from collections.abc import Callable

import torch

PREFIX = "K-FAC callback:"


def fmt(x: float) -> str:
    """A number as LBANN prints it (``%g``)."""
    return f"{x:g}"


def square(n: int) -> str:
    """A factor's shape, ``n x n``."""
    return f"{n}x{n}"


def options_line(options: dict[str, str]) -> str:
    """The setup line of the options, ``key=value`` in the given order."""
    return f"{PREFIX} " + " ".join(f"{k}={v}" for k, v in options.items())


def layer_line(name: str, kind: str, factors: list[tuple[str, int]], owner: int) -> str:
    """The setup line of one preconditioned layer: its factors' shapes and its owner rank."""
    shapes = ", ".join(f"{f} {square(n)}" for f, n in factors)
    return f"{PREFIX} layer {name} ({kind}): {shapes}, owner rank {owner}"


def damping_line(act: float, err: float, bn_act: float, bn_err: float, epochs: int) -> str:
    """LBANN's epoch-end line with the current dampings."""
    return (f"{PREFIX} changing damping value to {fmt(act)} (act), {fmt(err)} (err), "
            f"{fmt(bn_act)} (bn_act), {fmt(bn_err)} (bn_err) at {epochs} epochs")


def inverse_time_line(s: int, name: str, seconds: float, rank: int) -> str:
    return f"{PREFIX} step {s}: inverses of {name} took {seconds * 1e3:.3f} ms on rank {rank}"


def layer_note(s: int, name: str, note: str) -> str:
    """A note of one step about one layer."""
    return f"{PREFIX} step {s}: layer {name}: {note}"


NO_INVERSE = "no usable inverse; the layer keeps its plain gradient"
ZEROED = "non-finite gradient; zeroed for this step"
PLAIN_KEPT = "preconditioned gradient not finite; plain gradient kept"
BAD_FACTOR = "non-finite Kronecker factor skipped (running average kept)"


def matrix_lines(s: int, name: str, label: str, mat: torch.Tensor, summary: bool, full: bool) -> list[str]:
    """``--print-matrix-summary`` and ``--print-matrix`` lines of one factor or inverse."""
    lines = []
    if summary:
        lines.append(layer_note(s, name, f"{label} {square(mat.shape[0])} norm {float(mat.norm()):g} "
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
