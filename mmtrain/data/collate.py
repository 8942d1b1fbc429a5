"""Collators for fusion (image + text) batches: torchtune's ``padded_collate_tiled_images_and_mask``.

Input samples: ``tokens`` list[int] (text_seq_len), ``labels`` list[int], ``encoder_input`` with ``images``
(list of (n_tiles, c, h, w)) and ``aspect_ratio`` (list of (2,)), ``encoder_mask`` (list of bool
(text_seq_len, n_tiles * tokens_per_tile), or max_num_tiles * tokens_per_tile columns when the mask transform padded
it at inference), one entry per image.

Output:
    tokens: long (bsz, max_seq_len), padded with ``padding_idx``
    labels: long (bsz, max_seq_len), padded with ``ignore_idx``
    encoder_input.images: (bsz, max_num_images, max_num_tiles, c, h, w), zero tiles / zero images as padding
    encoder_input.aspect_ratio: long (bsz, max_num_images, 2), (1, 1) for padding images
    encoder_mask: bool (bsz, max_seq_len, n_mask_images * max_num_tiles * tokens_per_tile), n_mask_images =
        ``pad_max_images`` or max_num_images; image j's columns are the block
        [j * max_num_tiles * tokens_per_tile, (j + 1) * ...), matching the encoder's output order.

Known bug not copied: torchtune builds the concatenated mask with ``(bsz, n_imgs, seq, L).view(bsz, seq, -1)``,
which scrambles rows and images whenever a sample has more than one image; here the image axis is moved next to
the columns before flattening (tests/data/test_collate.py checks each image's block).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CROSS_ENTROPY_IGNORE_IDX", "padded_collate_tiled_images_and_mask"]

CROSS_ENTROPY_IGNORE_IDX = -100


def _pad_1d(seqs: list[torch.Tensor], length: int, value: int, left: bool) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if left:
            out[row, length - len(seq):] = seq
        else:
            out[row, : len(seq)] = seq
    return out


def _vision(sample: dict[str, Any]) -> dict[str, Any]:
    encoder_input = sample["encoder_input"]
    return encoder_input["vision"] if "vision" in encoder_input else encoder_input


def _tokens_per_tile(mask: torch.Tensor, n_tiles: int) -> int:
    """Columns per tile in one image's mask: ``(text_seq_len, n_tiles * tokens_per_tile)``, or, from
    ``VisionCrossAttentionMask(..., max_num_tiles)`` at inference, ``max_num_tiles * tokens_per_tile`` columns of
    which those past the image's own tiles are all False.

    A padded mask is recognised by the transform's layout: each row is True over exactly the image's own columns or
    nowhere, so the last True column ends the image. Any other mask is read as unpadded.
    """
    columns = mask.shape[1]
    mask = mask.bool()
    attending = mask.any(dim=1)
    if attending.any():
        used = int(mask[attending][0].nonzero()[-1]) + 1
        own_columns_only = bool(mask[attending, :used].all()) and not bool(mask[:, used:].any())
        if own_columns_only and used < columns and used % n_tiles == 0 and columns % (used // n_tiles) == 0:
            return used // n_tiles
    return columns // n_tiles


def padded_collate_tiled_images_and_mask(
    batch: list[dict[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_direction: str = "right",
    pad_max_tiles: int | None = None,
    pad_max_images: int | None = None,
    pad_to_multiple_of: int = 1,
) -> dict[str, Any]:
    """Pad text, tiles, images, aspect ratios and cross-attention masks of a batch (shapes in the module docstring).

    Raises:
        ValueError: ``pad_direction`` not "left"/"right"; ``pad_max_tiles`` below the batch's most tiles;
            ``pad_max_images`` below the batch's most images; ``pad_to_multiple_of > 1`` with left padding.
    """
    if pad_direction not in ("left", "right"):
        raise ValueError(f"pad_direction should be one of 'left' or 'right' but found {pad_direction}")
    left = pad_direction == "left"
    if left and pad_to_multiple_of > 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} is not supported for pad_direction='left'")

    tokens = [torch.as_tensor(s["tokens"], dtype=torch.long) for s in batch]
    max_seq_len = max(len(t) for t in tokens)
    has_labels = not left and all("labels" in s for s in batch)
    if has_labels:
        labels = [torch.as_tensor(s["labels"], dtype=torch.long) for s in batch]
        max_seq_len = max(max_seq_len, max(len(t) for t in labels))
    if pad_to_multiple_of > 1:
        max_seq_len = -(-max_seq_len // pad_to_multiple_of) * pad_to_multiple_of
    out: dict[str, Any] = {"tokens": _pad_1d(tokens, max_seq_len, padding_idx, left)}
    if has_labels:
        out["labels"] = _pad_1d(labels, max_seq_len, ignore_idx, left)

    all_images = [img for s in batch for img in _vision(s)["images"]]
    if not all_images:
        return out

    max_num_tiles = max(img.shape[0] for img in all_images)
    if pad_max_tiles is not None:
        if pad_max_tiles < max_num_tiles:
            raise ValueError(f"More tiles in image {max_num_tiles}, than pad_max_tiles {pad_max_tiles}")
        max_num_tiles = pad_max_tiles
    max_num_images = max(len(_vision(s)["images"]) for s in batch)
    mask_num_images = max_num_images
    if pad_max_images is not None:
        if pad_max_images < max_num_images:
            raise ValueError(f"More images in a sample {max_num_images}, than pad_max_images {pad_max_images}")
        # As torchtune: only the mask gets the extra columns (fixed cross-attention cache length at inference).
        mask_num_images = pad_max_images

    bsz = len(batch)
    c, h, w = all_images[0].shape[1:]
    images = all_images[0].new_zeros(bsz, max_num_images, max_num_tiles, c, h, w)
    aspect_ratio = torch.ones(bsz, max_num_images, 2, dtype=torch.long)
    with_masks = "encoder_mask" in batch[0]
    tokens_per_tile = None
    masks_per_sample: list[list[tuple[int, torch.Tensor]]] = []
    for row, sample in enumerate(batch):
        vision = _vision(sample)
        sample_masks = []
        for j, img in enumerate(vision["images"]):
            images[row, j, : img.shape[0]] = img
            aspect_ratio[row, j] = torch.as_tensor(vision["aspect_ratio"][j]).reshape(2)
            if with_masks:
                mask = sample["encoder_mask"][j]
                this_image = _tokens_per_tile(mask, img.shape[0])
                if tokens_per_tile is not None and this_image != tokens_per_tile:
                    raise ValueError(f"encoder_mask of image {j} in sample {row} has {this_image} columns per tile, "
                                     f"an earlier one {tokens_per_tile}")
                tokens_per_tile = this_image
                sample_masks.append((img.shape[0], mask))
        masks_per_sample.append(sample_masks)
    vision_out = {"images": images, "aspect_ratio": aspect_ratio}
    out["encoder_input"] = {"vision": vision_out} if "vision" in batch[0]["encoder_input"] else vision_out

    if with_masks:
        if tokens_per_tile is None:
            raise ValueError("encoder_mask given but no sample has an image")
        image_cols = max_num_tiles * tokens_per_tile
        # (bsz, seq, n_images, image_cols): the image axis sits next to the columns, so flattening keeps each row.
        encoder_mask = torch.zeros(bsz, max_seq_len, mask_num_images, image_cols, dtype=torch.bool)
        for row, sample_masks in enumerate(masks_per_sample):
            for j, (n_tiles, mask) in enumerate(sample_masks):  # noqa: B007
                text_len, cols = mask.shape
                cols = min(cols, image_cols)
                start = max_seq_len - text_len if left else 0
                encoder_mask[row, start : start + text_len, j, :cols] = mask[:, :cols].bool()
        out["encoder_mask"] = encoder_mask.reshape(bsz, max_seq_len, mask_num_images * image_cols)
    return out
