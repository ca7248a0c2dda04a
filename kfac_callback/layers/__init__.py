"""Layers of ours that K-FAC can see: drop-ins for PyTorch layers whose parts run functionally."""

from kfac_callback.layers.attention import InProjection, MultiheadAttention, swap_attention

__all__ = ["InProjection", "MultiheadAttention", "swap_attention"]
