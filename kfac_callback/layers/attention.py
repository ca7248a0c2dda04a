"""A multi-head attention whose projections run as modules (docs/algorithm.md §3, "Attention").

``nn.MultiheadAttention`` hands its projection weights to ``F.multi_head_attention_forward``:
neither its input projection nor ``out_proj`` is ever called as a module, so no module hook
sees their inputs or output gradients. Ours is a subclass with the same constructor, the same
parameters and state dict, and the same outputs, that calls its input projection (for
self-attention: one ``InProjection`` of width 3E) and ``out_proj`` as modules.

Why a module of ours rather than intercepting the functional call: the functional path is
an internal of PyTorch that changes between releases (fast paths, packed and unpacked
projections), while a module call is the public contract that hooks are built on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class InProjection(nn.Module):
    """The input projection ``[q|k|v] = x W_inᵀ + b_in`` of its attention, as a module call.

    It owns no parameters (``weight`` and ``bias`` are its attention's ``in_proj_weight`` and
    ``in_proj_bias``), so the attention's state dict is exactly nn.MultiheadAttention's.
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        # Not a submodule: a plain reference back (state dict and .to() walk children only).
        object.__setattr__(self, "attention", attention)

    @property
    def weight(self) -> nn.Parameter:
        return self.attention.in_proj_weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.attention.in_proj_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same arguments, parameters, state dict and outputs) whose
    projections K-FAC preconditions: self-attention calls ``in_proj`` once on x, and every
    call ends in ``out_proj``. Cross-attention (query, key and value not one tensor) projects
    functionally, as PyTorch does: its input projection is then left to the base optimizer.

    Raises:
        ValueError: For ``kdim``/``vdim`` other than ``embed_dim``, ``add_bias_kv`` or
            ``add_zero_attn`` (keep ``nn.MultiheadAttention`` for those).
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (nn.MultiheadAttention's)
        super().__init__(*args, **kwargs)
        if not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn:
            raise ValueError("kfac_callback.MultiheadAttention: kdim/vdim other than embed_dim, add_bias_kv and "
                             "add_zero_attn are not supported; keep nn.MultiheadAttention for this layer")
        self.in_proj = InProjection(self)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value)
        mask = self._additive_mask(attn_mask, key_padding_mask, q, k)
        out, weights = self._attend(q, k, v, mask, need_weights)
        out = self.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _project(self, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as batch × heads × tokens × head width."""
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            w, b = self.in_proj_weight.chunk(3), (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = (F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), w, b, strict=True))
        heads, width = self.num_heads, self.head_dim
        return tuple(t.reshape(t.shape[0], t.shape[1], heads, width).transpose(1, 2) for t in (q, k, v))

    def _additive_mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                       q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """One float mask added to the scores (−inf where a bool mask says True), broadcast to
        batch × heads × queries × keys."""
        mask = None
        for m, shape in ((attn_mask, None), (key_padding_mask, (k.shape[0], 1, 1, k.shape[2]))):
            if m is None:
                continue
            m = torch.zeros_like(m, dtype=q.dtype).masked_fill_(m, float("-inf")) if m.dtype == torch.bool else m.to(q.dtype)
            if shape is not None:
                m = m.reshape(shape)
            elif m.dim() == 3:  # (batch·heads) × queries × keys
                m = m.reshape(q.shape[0], self.num_heads, q.shape[2], k.shape[2])
            mask = m if mask is None else mask + m
        return mask

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        dropout = self.dropout if self.training else 0.0
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        return F.dropout(weights, dropout, self.training) @ v, weights


def swap_attention(model: nn.Module) -> list[str]:
    """Replaces every ``nn.MultiheadAttention`` of ``model`` that ours supports by ours, in place,
    keeping the very same parameter objects (an optimizer or DDP built before stays valid).

    Returns:
        The names of the replaced layers.
    """
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.MultiheadAttention or not supported(child):
                continue
            ours = MultiheadAttention(child.embed_dim, child.num_heads, dropout=child.dropout,
                                      bias=child.in_proj_bias is not None, batch_first=child.batch_first,
                                      device="meta")
            ours.in_proj_weight, ours.in_proj_bias, ours.out_proj = child.in_proj_weight, child.in_proj_bias, child.out_proj
            ours.train(child.training)
            setattr(parent, name, ours)
            swapped.append(f"{parent_name}.{name}" if parent_name else name)
    return swapped


def supported(attention: nn.MultiheadAttention) -> bool:
    """Whether ``MultiheadAttention`` of ours can stand for this one."""
    return attention._qkv_same_embed_dim and attention.bias_k is None and not attention.add_zero_attn
