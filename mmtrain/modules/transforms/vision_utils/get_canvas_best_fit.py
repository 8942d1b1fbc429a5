"""Canvas choice for tiled images: the resolutions a tile budget allows and the best fit for an image.

Shapes: images are (..., h, w) tensors; resolutions are (height, width) in pixels.
"""

from __future__ import annotations

import torch

__all__ = ["find_supported_resolutions", "get_canvas_best_fit"]


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
