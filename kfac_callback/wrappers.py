"""The user's model inside DDP / DataParallel / torch.compile wrappers, and its layer names."""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

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
