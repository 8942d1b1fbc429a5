"""CLIP vision encoder builders, its positional embeddings and the tiled CLIP image transform (torchtune's API)."""

from mmtrain.models.clip._component_builders import clip_mlp, clip_vision_encoder
from mmtrain.models.clip._position_embeddings import (
    TiledTokenPositionalEmbedding,
    TilePositionalEmbedding,
    TokenPositionalEmbedding,
)
from mmtrain.models.clip._transform import CLIPImageTransform

__all__ = [
    "CLIPImageTransform",
    "TilePositionalEmbedding",
    "TiledTokenPositionalEmbedding",
    "TokenPositionalEmbedding",
    "clip_mlp",
    "clip_vision_encoder",
]
