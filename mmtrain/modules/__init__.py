"""Model-agnostic building blocks: attention, transformer layers, the tiled vision transformer, embeddings."""

from mmtrain.modules.transformer import (
    FeedForward,
    Fp32LayerNorm,
    RMSNorm,
    TanhGate,
    TransformerCrossAttentionLayer,
    TransformerSelfAttentionLayer,
)

__all__ = [
    "FeedForward",
    "Fp32LayerNorm",
    "RMSNorm",
    "TanhGate",
    "TransformerCrossAttentionLayer",
    "TransformerSelfAttentionLayer",
]
