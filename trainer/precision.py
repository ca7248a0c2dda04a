"""Mixed precision: ``trainer.precision`` = fp32 | bf16 | fp16 (docs/algorithm.md §3, §5).

bf16 and fp16 run the forward pass and the loss under ``torch.autocast``; the weights, the
optimizer and K-FAC's factors and inverses stay in float32. fp16 adds a
``torch.amp.GradScaler``: the loss is scaled before backward, the gradients are unscaled
(``unscale_``) before K-FAC's step sees them, and a step whose scaled gradients are not
finite is skipped by the scaler, K-FAC's factors untouched. fp16 autocast needs a GPU; bf16
runs on CPUs and GPUs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from trainer.config import PRECISIONS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """How a step's forward and backward run.

    Attributes:
        name: fp32, bf16 or fp16.
        device_type: ``cpu`` or ``cuda``.
        scaler: The fp16 loss scaler (``None`` otherwise).
    """

    name: str
    device_type: str
    scaler: Optional[Any] = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of the forward pass and the loss: autocast to bf16/fp16, or nothing."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.name])

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (scaled for fp16)."""
        return loss if self.scaler is None else self.scaler.scale(loss)


def make_precision(name: str, device: torch.device) -> Precision:
    """The precision of a run on ``device``.

    Raises:
        ValueError: fp16 without a CUDA device, or an unknown name (one line, what to do).
    """
    if name not in PRECISIONS:
        raise ValueError(f"trainer.precision: {name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision=fp16: fp16 with a loss scaler is for GPUs, and this rank runs on "
                         f"{device.type}; use trainer.precision=bf16 (autocast on CPUs) or fp32")
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return Precision(name, device.type, scaler)
