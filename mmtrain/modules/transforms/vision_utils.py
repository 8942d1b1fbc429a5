"""Image helpers for tiled vision encoders (torchtune's ``vision_utils``: canvas choice, resize-and-pad, tiling).

Shapes: images are (c, h, w) tensors; resolutions are (height, width) in pixels.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

__all__ = ["find_supported_resolutions", "get_canvas_best_fit", "resize_with_pad", "tile_crop"]


def find_supported_resolutions(max_num_tiles: int, tile_size: int) -> list[tuple[int, int]]:
    """Every canvas (h_tiles * tile_size, w_tiles * tile_size) with h_tiles * w_tiles <= max_num_tiles."""
    return [
        (rows * tile_size, cols * tile_size)
        for rows in range(1, max_num_tiles + 1)
        for cols in range(1, max_num_tiles // rows + 1)
    ]


def get_canvas_best_fit(
    image: torch.Tensor, possible_resolutions: torch.Tensor | list[tuple[int, int]], resize_to_max_canvas: bool
) -> tuple[int, int]:
    """The canvas an image (..., h, w) fits best without distortion.

    Each canvas allows scaling by ``min(canvas_h / h, canvas_w / w)``. If some canvas needs no downscaling, pick the
    smallest such scale (the largest with ``resize_to_max_canvas``); otherwise the largest downscale. Ties go to the
    canvas of least area.
    """
    height, width = image.shape[-2:]
    resolutions = torch.as_tensor(possible_resolutions)
    scale_h = resolutions[:, 0] / height
    scale_w = resolutions[:, 1] / width
    scales = torch.minimum(scale_h, scale_w)
    upscaling = scales[scales >= 1]
    if len(upscaling) > 0:
        selected = upscaling.max() if resize_to_max_canvas else upscaling.min()
    else:
        selected = scales[scales < 1].max()
    chosen = resolutions[scales == selected]
    if len(chosen) > 1:
        chosen = chosen[torch.argmin(chosen[:, 0] * chosen[:, 1])].unsqueeze(0)
    return tuple(int(v) for v in chosen[0].tolist())  # type: ignore[return-value]


def _max_res_without_distortion(image_size: tuple[int, int], target_size: tuple[int, int]) -> tuple[int, int]:
    height, width = image_size
    target_h, target_w = target_size
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.floor(height * scale_w), target_h), target_w
    return target_h, min(math.floor(width * scale_h), target_w)


def resize_with_pad(
    image: torch.Tensor, target_size: tuple[int, int], resample: InterpolationMode | str = "bilinear",
    max_size: int | None = None,
) -> torch.Tensor:
    """Resize (c, h, w) keeping the aspect ratio to fit ``target_size`` and pad bottom/right with zeros to it.

    ``max_size`` limits upscaling: a side smaller than ``max_size`` is not upscaled past ``max_size``.
    """
    height, width = image.shape[-2:]
    if max_size is not None:
        resize_target = (min(max(height, max_size), target_size[0]), min(max(width, max_size), target_size[1]))
    else:
        resize_target = target_size
    new_h, new_w = _max_res_without_distortion((height, width), resize_target)
    if isinstance(resample, str):
        resample = InterpolationMode(resample.lower())
    image = TF.resize(image, [new_h, new_w], interpolation=resample, antialias=True)
    return TF.pad(image, [0, 0, target_size[1] - new_w, target_size[0] - new_h])


def tile_crop(image: torch.Tensor, tile_size: int) -> torch.Tensor:
    """(c, h, w) with h, w multiples of tile_size -> (n_tiles, c, tile_size, tile_size), tiles row-major."""
    channels, height, width = image.shape
    if height % tile_size or width % tile_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of tile_size={tile_size}")
    rows, cols = height // tile_size, width // tile_size
    tiles = image.view(channels, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, channels, tile_size, tile_size)
