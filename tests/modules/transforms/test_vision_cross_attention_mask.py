"""VisionCrossAttentionMask on the page's figure: "<img1><img2>These are two dogs. <img3>This is a cat."."""

import pytest
import torch

from mmtrain.errors import DataError
from mmtrain.modules.transforms import VisionCrossAttentionMask

IMG = 99
# <img1> <img2> These are two dogs. <img3> This is a cat.
TOKENS = [IMG, IMG, 1, 2, 3, 4, IMG, 5, 6, 7, 8]
FIGURE = [
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # img1
    [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # img2
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],  # img3
]


def _sample(tiles=(1, 2, 3)):
    return {"tokens": list(TOKENS), "encoder_input": {"images": [torch.zeros(t, 3, 4, 4) for t in tiles]}}


def test_page_figure():
    transform = VisionCrossAttentionMask(tile_size=4, patch_size=2, image_token_id=IMG)  # 4 patches + CLS per tile
    masks = transform(_sample())["encoder_mask"]
    assert [tuple(m.shape) for m in masks] == [(11, 5), (11, 10), (11, 15)]
    for mask, row in zip(masks, FIGURE):
        assert mask.dtype == torch.bool
        # every column of an image's tokens follows the figure's row
        assert torch.equal(mask, torch.tensor(row, dtype=torch.bool)[:, None].expand_as(mask))


def test_inference_pads_columns_to_max_num_tiles():
    transform = VisionCrossAttentionMask(tile_size=4, patch_size=2, image_token_id=IMG, max_num_tiles=4)
    masks = transform(_sample(), inference=True)["encoder_mask"]
    assert all(m.shape == (11, 20) for m in masks)
    assert masks[1][:, :10].any() and not masks[1][:, 10:].any()
    assert transform(_sample())["encoder_mask"][1].shape == (11, 10)  # training: no padding


def test_mismatch_raises():
    transform = VisionCrossAttentionMask(tile_size=4, patch_size=2, image_token_id=IMG)
    with pytest.raises(RuntimeError, match=r"number of image tokens \(3\) does not match the number of images \(2\)"):
        transform(_sample(tiles=(1, 2)))
    with pytest.raises(DataError):
        transform({"tokens": [1, 2], "encoder_input": {"images": [torch.zeros(1, 3, 4, 4)]}})
    assert transform({"tokens": [1, 2], "encoder_input": {"images": []}})["encoder_mask"] == []


def test_image_attention_intervals_are_public_as_in_torchtune():
    transform = VisionCrossAttentionMask(tile_size=4, patch_size=2, image_token_id=IMG)
    # img1 and img2 both attend to "These are two dogs." (up to img3); img3 to the end
    assert transform.get_image_attention_intervals(TOKENS) == [[0, 6], [1, 6], [6, 11]]
    assert transform.get_image_attention_intervals([1, 2, 3]) == []
    assert transform._get_image_attention_intervals(TOKENS) == [[0, 6], [1, 6], [6, 11]]  # torchtune's name
