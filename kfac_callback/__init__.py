"""K-FAC as a callback: Kronecker-factored preconditioning of Linear, Conv2d and BatchNorm.

The algorithm is docs/algorithm.md; the layout of this package docs/design.md. See ``KFACCallback``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kfac_callback.config import KFACConfig, make_config, validate_kfac

if TYPE_CHECKING:
    from kfac_callback.callback import KFACCallback

__all__ = ["KFACCallback", "KFACConfig", "make_config", "validate_kfac"]


def __getattr__(name: str) -> Any:
    """``KFACCallback`` on first use: the config and its validation run without importing torch."""
    if name == "KFACCallback":
        from kfac_callback.callback import KFACCallback

        return KFACCallback
    raise AttributeError(f"module 'kfac_callback' has no attribute {name!r}")
