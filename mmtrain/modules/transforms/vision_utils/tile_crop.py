"""Cut a canvas into tiles: (c, h, w) -> (n_tiles, c, tile_size, tile_size), row-major."""

from __future__ import annotations

import torch

__all__ = ["tile_crop"]


def tile_crop(image: torch.Tensor, tile_size: int) -> torch.Tensor:
    """(c, h, w) with h, w multiples of tile_size -> (n_tiles, c, tile_size, tile_size), tiles row-major."""
    channels, height, width = image.shape
    if height % tile_size or width % tile_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of tile_size={tile_size}")
    rows, cols = height // tile_size, width // tile_size
    tiles = image.view(channels, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, channels, tile_size, tile_size)
