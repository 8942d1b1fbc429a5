"""``VisionCrossAttentionMask``: which text tokens cross-attend to which image (torchtune's transform, Flamingo
Fig. 7 layout).

A text token attends to the image whose image token precedes it, up to the next image token; consecutive image
tokens all attend to the text that follows the last of them. One bool mask per image, shape
``(text_seq_len, image_seq_len)`` with ``image_seq_len = n_tiles * (patches_per_tile + 1)`` (or
``max_num_tiles * (patches_per_tile + 1)`` columns at inference when ``max_num_tiles`` is set). True attends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmtrain.errors import DataError

__all__ = ["ImageTokenMismatchError", "VisionCrossAttentionMask"]


class ImageTokenMismatchError(DataError, RuntimeError):
    """A sample whose number of image tokens differs from its number of images (a RuntimeError, as torchtune's)."""


class VisionCrossAttentionMask:
    """Builds ``sample["encoder_mask"]`` from ``sample["tokens"]`` and ``sample["encoder_input"]["images"]``.

    Args:
        tile_size: tile side in pixels.
        patch_size: patch side in pixels (tile_size // patch_size patches per side).
        image_token_id: token id of the image special token.
        max_num_tiles: pads each mask to ``max_num_tiles`` tiles of columns at inference.
    """

    def __init__(self, tile_size: int, patch_size: int, image_token_id: int, max_num_tiles: int | None = None) -> None:
        patch_grid_size = tile_size // patch_size
        self.patches_per_tile = patch_grid_size**2
        self.image_token_id = image_token_id
        self.max_num_tiles = max_num_tiles

    def get_image_attention_intervals(self, tokens: list[int]) -> list[list[int]]:
        """[start, end) of the text each image attends to, one interval per image token, in order."""
        end = len(tokens)
        locations = [i for i, token in enumerate(tokens) if token == self.image_token_id]
        if not locations:
            return []
        intervals = [[prev, nxt] for prev, nxt in zip(locations[:-1], locations[1:])]
        intervals.append([locations[-1], end])
        # Consecutive image tokens share the text after the last of them: walk back, extending each interval that
        # ends right at the next image token.
        last_end = intervals[-1][1]
        for interval in reversed(intervals):
            if interval[0] == interval[1] - 1:
                interval[1] = last_end
            last_end = interval[1]
        return intervals

    # torchtune's own name (private there; its docstring examples call it), so ported code keeps working.
    _get_image_attention_intervals = get_image_attention_intervals

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """sample: ``tokens`` list[int] (len text_seq_len), ``encoder_input.images`` list of (n_tiles, c, h, w).

        Adds ``encoder_mask``: list of bool (text_seq_len, image_seq_len), one per image.

        Raises:
            ImageTokenMismatchError (a RuntimeError and a DataError): image tokens and images differ in number.
        """
        tokens = list(sample["tokens"])
        images = sample["encoder_input"]["images"]
        intervals = self.get_image_attention_intervals(tokens)
        if len(intervals) != len(images):
            raise ImageTokenMismatchError(
                f"The number of image tokens ({len(intervals)}) does not match the number of images "
                f"({len(images)})."
            )
        text_seq_len = len(tokens)
        tokens_per_tile = self.patches_per_tile + 1  # +1 for the CLS token
        padded_len = None
        if inference and self.max_num_tiles is not None:
            padded_len = self.max_num_tiles * tokens_per_tile
        masks = []
        for (start, end), image in zip(intervals, images):
            image_seq_len = image.shape[0] * tokens_per_tile
            mask = torch.zeros(text_seq_len, padded_len or image_seq_len, dtype=torch.bool)
            mask[start:end, :image_seq_len] = True
            masks.append(mask)
        sample.update({"encoder_mask": masks})  # type: ignore[attr-defined]
        return sample
