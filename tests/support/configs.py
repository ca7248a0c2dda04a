"""The composed schema with a few keys of one group set, for validation tests."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer.config import Config


def config_with(group: str, **values: Any) -> DictConfig:
    """``Config``'s structured schema with ``<group>.<key> = value`` for each keyword."""
    cfg = OmegaConf.structured(Config)
    for key, value in values.items():
        cfg[group][key] = value
    return cfg
