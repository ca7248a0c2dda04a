"""K-FAC as a callback: Kronecker-factored preconditioning of Linear, Conv2d and BatchNorm.

The algorithm is docs/algorithm.md; the layout of this package docs/design.md. See ``KFACCallback``.
"""

from __future__ import annotations

from kfac_callback.callback import KFACCallback
from kfac_callback.config import KFACConfig, make_config, validate_kfac

__all__ = ["KFACCallback", "KFACConfig", "make_config", "validate_kfac"]
