"""K-FAC as a callback: Kronecker-factored preconditioning of Linear, Conv2d and BatchNorm.

The contract is the project's K-FAC spec (KFAC_SPEC.md, sections 3-7); see ``KFACCallback``.
"""

from __future__ import annotations

from kfac_callback.callback import KFACCallback, make_config
from kfac_callback.config import KFACConfig, validate_kfac

__all__ = ["KFACCallback", "KFACConfig", "make_config", "validate_kfac"]
