"""Swappable attention mechanisms (xFormers' API on modern kernels) and the multi-head wrapper.

See ``base`` for the tensor shapes and mask conventions every mechanism shares. Registry names (as xFormers):
``scaled_dot_product``, ``local``, ``linformer``, ``nystrom``, ``random``, ``orthoformer``, ``global``, ``favor``.
"""

from mmtrain.modules.attention.base import (
    ATTENTION_REGISTRY,
    Attention,
    AttentionConfig,
    AttentionConfigError,
    build_attention,
    register_attention,
)
from mmtrain.modules.attention.core import AttentionMask, ScaledDotProduct
from mmtrain.modules.attention.favor import FavorAttention
from mmtrain.modules.attention.feature_maps import FeatureMapType, SMHyperbolic, SMOrf, SMReg
from mmtrain.modules.attention.global_attention import GlobalAttention
from mmtrain.modules.attention.linformer import LinformerAttention
from mmtrain.modules.attention.local import LocalAttention
from mmtrain.modules.attention.multi_head import KVCache, MultiHeadAttention, set_fused_qkv
from mmtrain.modules.attention.nystrom import NystromAttention
from mmtrain.modules.attention.orthoformer import LandmarkSelection, OrthoFormerAttention
from mmtrain.modules.attention.random_attention import RandomAttention

__all__ = [
    "ATTENTION_REGISTRY",
    "Attention",
    "AttentionConfig",
    "AttentionConfigError",
    "AttentionMask",
    "FavorAttention",
    "FeatureMapType",
    "GlobalAttention",
    "KVCache",
    "LandmarkSelection",
    "LinformerAttention",
    "LocalAttention",
    "MultiHeadAttention",
    "NystromAttention",
    "OrthoFormerAttention",
    "RandomAttention",
    "SMHyperbolic",
    "SMOrf",
    "SMReg",
    "ScaledDotProduct",
    "build_attention",
    "register_attention",
    "set_fused_qkv",
]
