"""Model-agnostic building blocks: attention, transformer layers, the tiled vision transformer, embeddings."""

from mmtrain.modules.position_embeddings import (
    TiledTokenPositionalEmbedding,
    TilePositionalEmbedding,
    TokenPositionalEmbedding,
)
from mmtrain.modules.rope import RotaryPositionalEmbeddings, VisionRotaryPositionalEmbeddings
from mmtrain.modules.transformer import (
    FeedForward,
    Fp32LayerNorm,
    RMSNorm,
    TanhGate,
    TransformerCrossAttentionLayer,
    TransformerSelfAttentionLayer,
)
from mmtrain.modules.vision_transformer import CLSEmbedding, CLSProjection, VisionTransformer

__all__ = [
    "CLSEmbedding",
    "CLSProjection",
    "FeedForward",
    "Fp32LayerNorm",
    "RMSNorm",
    "RotaryPositionalEmbeddings",
    "TanhGate",
    "TilePositionalEmbedding",
    "TiledTokenPositionalEmbedding",
    "TokenPositionalEmbedding",
    "TransformerCrossAttentionLayer",
    "TransformerSelfAttentionLayer",
    "VisionRotaryPositionalEmbeddings",
    "VisionTransformer",
]
