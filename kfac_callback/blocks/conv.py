"""``nn.Conv1d`` and ``nn.Conv2d``: factors of patches and of output gradients over positions
(docs/algorithm.md §3), any stride, padding, dilation, padding mode and groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kfac_callback.blocks.kronecker import KroneckerBlock


def _explicit_padding(conv: nn.Conv1d | nn.Conv2d) -> list[int]:
    """The conv's padding as ``F.pad`` takes it (last dimension first, left then right),
    'same' split as PyTorch splits it (the extra element on the right)."""
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return [0] * (2 * dims)
    pad = []
    for d in reversed(range(dims)):
        if conv.padding == "same":
            total = conv.dilation[d] * (conv.kernel_size[d] - 1)
            pad += [total // 2, total - total // 2]
        else:
            pad += [conv.padding[d], conv.padding[d]]
    return pad


class ConvBlock(KroneckerBlock):
    """``nn.Conv1d`` / ``nn.Conv2d`` (KFC): patches from ``unfold``, positions share the weight.

    Expand (KFC): ``A = (1/N) Σ p̄ p̄ᵀ`` and ``G = (N/|T|) Σ e eᵀ`` over samples and positions;
    reduce: one row per sample (``KroneckerBlock.shared_terms``). A grouped convolution has one
    Kronecker block per group; they are held as one block-diagonal A and G, so the layer is a
    single Kronecker block of the rest of the callback: P = G⁻¹ blockdiag(∇W_g | ∇b_g) A⁻¹ keeps
    the block structure, and its diagonal blocks are the groups' preconditioned gradients.
    """

    kind = "conv2d"

    def __init__(self, name: str, module: nn.Conv1d | nn.Conv2d, weight_sharing: str = "expand") -> None:
        super().__init__(name, module, weight_sharing)
        self.kind = "conv2d" if isinstance(module, nn.Conv2d) else "conv1d"
        self.groups = module.groups
        self.pad = _explicit_padding(module)
        mode = module.padding_mode
        self.pad_mode = "constant" if mode == "zeros" else mode

    def factor_dims(self) -> list[int]:
        return [self.groups * (self.in_features() + int(self.has_bias)), self.out_features()]

    def patches(self, a: torch.Tensor) -> torch.Tensor:
        """(n, T, C_in/groups·k) per group: (n, T, groups, ·), channel-major as the weight."""
        conv = self.module
        if a.dim() == 3:  # Conv1d: a 2-d convolution over (1, L)
            a = a.unsqueeze(2)
        kernel, dilation, stride = (tuple(conv.kernel_size), tuple(conv.dilation), tuple(conv.stride))
        if len(kernel) == 1:
            kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
        pad = self.pad + [0, 0] if len(self.pad) == 2 else self.pad
        if any(pad):
            a = F.pad(a, pad, mode=self.pad_mode)
        cols = F.unfold(a, kernel, dilation=dilation, stride=stride)  # (n, C_in·k, T)
        return cols.transpose(1, 2).reshape(a.shape[0], cols.shape[2], self.groups, cols.shape[1] // self.groups)

    def gram_terms(self, a: torch.Tensor, g: torch.Tensor, n_global: int,
                   n_local: int | None = None, keep: int | None = None) -> list[tuple[torch.Tensor, float]]:
        n = a.shape[0] if n_local is None else n_local
        if keep is not None:  # a subsample: every position of its samples (docs/algorithm.md §3)
            a, g = a[:keep], g[:keep]
        patches = self.patches(a.to(self.dtype))
        outs = g.to(self.dtype).flatten(2).transpose(1, 2)  # (n, T, C_out)
        if self.groups == 1:
            return self.shared_terms(patches[:, :, 0], outs, n, n_global)
        # Rows × groups × columns: micro-batches join along the rows, each group's Gram is its own.
        outs = outs.reshape(outs.shape[0], outs.shape[1], self.groups, outs.shape[2] // self.groups)
        return self.shared_terms(patches, outs, n, n_global)

    # -- a grouped convolution: block-diagonal factors ---------------------------------

    def contributions(self, a, g, n_global, keep=None):  # noqa: ANN001, ANN201 (Block's signature)
        if self.groups == 1:
            return super().contributions(a, g, n_global, keep)
        out = []
        for x, c in self.step_terms(a, g, n_global, keep):
            per = x.transpose(0, 1).contiguous()  # groups × rows × columns (a strided bmm is ~2x slower)
            out.append(torch.block_diag(*(per.mT @ per).mul_(c)))
        return out

    def accumulate(self, a, g, n_global, decay, keep=None):  # noqa: ANN001, ANN201 (Block's signature)
        if self.groups == 1:
            return super().accumulate(a, g, n_global, decay, keep)
        return self.update_factors(self.contributions(a, g, n_global, keep), decay)

    def _grad_matrix(self, grads: list[torch.Tensor]) -> torch.Tensor:
        if self.groups == 1:
            return super()._grad_matrix(grads)
        gw = grads[0].reshape(self.groups, -1, self.in_features())
        if self.has_bias:
            gw = torch.cat([gw, grads[1].reshape(self.groups, -1, 1)], dim=2)
        return torch.block_diag(*gw)

    def _split(self, p: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.groups == 1:
            return super()._split(p, grads)
        width = self.in_features() + int(self.has_bias)
        blocks = p.reshape(self.groups, -1, self.groups, width)
        index = torch.arange(self.groups, device=p.device)
        diagonal = blocks[index, :, index]  # groups × out/groups × width
        out = [diagonal[..., :self.in_features()].reshape(grads[0].shape).to(grads[0].dtype)]
        if self.has_bias:
            out.append(diagonal[..., -1].reshape(grads[1].shape).to(grads[1].dtype))
        return out
