"""Image helpers for tiled vision encoders, laid out as torchtune's ``vision_utils`` package so its import paths
(``...vision_utils.tile_crop import tile_crop``) work: canvas choice, resize-and-pad, tiling.
"""

from mmtrain.modules.transforms.vision_utils.get_canvas_best_fit import (
    find_supported_resolutions,
    get_canvas_best_fit,
)
from mmtrain.modules.transforms.vision_utils.resize_with_pad import resize_with_pad
from mmtrain.modules.transforms.vision_utils.tile_crop import tile_crop

__all__ = ["find_supported_resolutions", "get_canvas_best_fit", "resize_with_pad", "tile_crop"]
