"""A callback that records the hooks the trainer calls."""

from __future__ import annotations

from kfac_callback.base import HOOKS, Callback


class HookRecorder(Callback):
    """Records the name of every hook the trainer calls, in order (``calls``)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattribute__(self, name: str):
        if name in HOOKS:
            return lambda trainer: object.__getattribute__(self, "calls").append(name)
        return object.__getattribute__(self, name)
