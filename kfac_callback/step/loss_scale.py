"""Mixed precision: the grad scaler's loss scale, or that it skips this step (docs/algorithm.md §5)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kfac_callback.blocks.linalg import all_finite


def loss_scale(scaler: Any, model: nn.Module) -> float | None:
    """The grad scaler's loss scale (1 without one), or ``None`` when the scaler will skip
    this step because the scaled gradients were not finite.

    Raises:
        ValueError: The scaler has not unscaled the gradients yet (``scaler.unscale_`` must
            come before ``step()``, so K-FAC sees the true gradient).
    """
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
    elif not all(all_finite(p.grad) for p in model.parameters() if p.grad is not None):
        return None
    return float(scaler.get_scale())
