"""CLIP vision encoder builders and the tiled CLIP image transform (torchtune's API)."""

from mmtrain.models.clip._component_builders import clip_mlp, clip_vision_encoder
from mmtrain.models.clip._transform import CLIPImageTransform

__all__ = ["CLIPImageTransform", "clip_mlp", "clip_vision_encoder"]
