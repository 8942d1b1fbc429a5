"""Swappable attention mechanisms (xFormers' API on modern kernels) and the multi-head wrapper.

See ``base`` for the tensor shapes and mask conventions every mechanism shares.
"""

from mmtrain.modules.attention.base import (
    ATTENTION_REGISTRY,
    Attention,
    AttentionConfig,
    build_attention,
    register_attention,
)
from mmtrain.modules.attention.core import AttentionMask, ScaledDotProduct
from mmtrain.modules.attention.multi_head import KVCache, MultiHeadAttention

__all__ = [
    "ATTENTION_REGISTRY",
    "Attention",
    "AttentionConfig",
    "AttentionMask",
    "KVCache",
    "MultiHeadAttention",
    "ScaledDotProduct",
    "build_attention",
    "register_attention",
]
