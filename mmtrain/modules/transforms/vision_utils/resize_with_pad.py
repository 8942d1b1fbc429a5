"""Resize without distortion to fit a canvas, then pad bottom/right: (c, h, w) -> (c, canvas_h, canvas_w)."""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

__all__ = ["resize_with_pad"]


def _max_res_without_distortion(image_size: tuple[int, int], target_size: tuple[int, int]) -> tuple[int, int]:
    height, width = image_size
    target_h, target_w = target_size
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.floor(height * scale_w), target_h), target_w
    return target_h, min(math.floor(width * scale_h), target_w)


def interpolation_mode(resample: InterpolationMode | str) -> InterpolationMode:
    """``"nearest_exact"`` (torchtune's spelling, an enum name) or ``"nearest-exact"`` (torchvision's value), any case."""
    if isinstance(resample, InterpolationMode):
        return resample
    try:
        return InterpolationMode[str(resample).upper().replace("-", "_")]
    except KeyError:
        names = ", ".join(mode.name.lower() for mode in InterpolationMode)
        raise ValueError(f"unknown resample {resample!r}; choose from {names}") from None


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
    resample = interpolation_mode(resample)
    image = TF.resize(image, [new_h, new_w], interpolation=resample, antialias=True)
    return TF.pad(image, [0, 0, target_size[1] - new_w, target_size[0] - new_h])
