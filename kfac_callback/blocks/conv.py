"""``nn.Conv2d``: factors of patches and of output gradients over positions (docs/algorithm.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kfac_callback.blocks.kronecker import KroneckerBlock


def _conv_padding(name: str, conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's padding as two ints, refusing what ``unfold`` cannot reproduce."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        if any(k % 2 == 0 for k in conv.kernel_size):
            raise ValueError(f"K-FAC: layer {name!r}: padding='same' with an even kernel "
                             "(asymmetric padding) is not supported")
        return tuple((k - 1) // 2 for k in conv.kernel_size)
    return tuple(conv.padding)


class Conv2dBlock(KroneckerBlock):
    """``nn.Conv2d`` (KFC): patches from ``unfold``, ``G`` scaled by N/|T| (docs/algorithm.md §3).

    Raises:
        ValueError: For dilation or groups other than 1, or a padding mode other than zeros,
            naming the layer.
    """

    kind = "conv2d"

    def __init__(self, name: str, module: nn.Conv2d) -> None:
        if tuple(module.dilation) != (1, 1) or module.groups != 1:
            raise ValueError(f"K-FAC: layer {name!r}: convolution with dilation "
                             f"{tuple(module.dilation)} and groups {module.groups} is not "
                             "supported (both must be 1); disable it with kfac.disable_layers")
        if module.padding_mode != "zeros":
            raise ValueError(f"K-FAC: layer {name!r}: padding_mode {module.padding_mode!r} is not "
                             "supported (only 'zeros'); disable it with kfac.disable_layers")
        super().__init__(name, module)
        self.padding = _conv_padding(name, module)

    def gram_terms(self, a: torch.Tensor, g: torch.Tensor, n_global: int,
                   n_local: int | None = None, keep: int | None = None) -> list[tuple[torch.Tensor, float]]:
        conv = self.module
        n = a.shape[0] if n_local is None else n_local
        if keep is not None:  # a subsample: every position of its samples (docs/algorithm.md §3)
            a, g = a[:keep], g[:keep]
        # (n, C_in·kh·kw, T): the channel-major patch layout matches weight.reshape(C_out, -1).
        patches = F.unfold(a.to(self.dtype), conv.kernel_size, padding=self.padding,
                           stride=conv.stride)
        rows = self._with_ones(patches.transpose(1, 2).reshape(-1, patches.shape[1]))
        positions = g.shape[2] * g.shape[3]
        gr = g.to(self.dtype).permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        # A = (1/N) Σ p̄ p̄ᵀ; G = (N/|T|) Σ e eᵀ with e = grad_output·n/N.
        return [(rows, 1.0 / n_global), (gr, n * n / (n_global * positions))]
