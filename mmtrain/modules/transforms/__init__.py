"""Sample transforms for vision-language data: cross-attention masks and tiled-image helpers."""

from mmtrain.modules.transforms.vision_cross_attention_mask import (
    ImageTokenMismatchError,
    VisionCrossAttentionMask,
)
from mmtrain.modules.transforms.vision_utils import (
    find_supported_resolutions,
    get_canvas_best_fit,
    resize_with_pad,
    tile_crop,
)

__all__ = [
    "ImageTokenMismatchError",
    "VisionCrossAttentionMask",
    "find_supported_resolutions",
    "get_canvas_best_fit",
    "resize_with_pad",
    "tile_crop",
]
