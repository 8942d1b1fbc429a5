"""CLIP image transform: best-fit canvas, resize without distortion, padding, tiles and aspect ratio."""

import io

import pytest
import torch
from PIL import Image

from mmtrain.errors import DataError
from mmtrain.models.clip import CLIPImageTransform
from mmtrain.modules.transforms import find_supported_resolutions, get_canvas_best_fit, resize_with_pad


def test_supported_resolutions():
    got = sorted(find_supported_resolutions(max_num_tiles=4, tile_size=224))
    assert got == sorted([(224, 224), (224, 448), (448, 224), (224, 672), (672, 224), (224, 896), (896, 224),
                          (448, 448)])


@pytest.mark.parametrize(
    "height,width,to_max,expected",
    [
        # scale per canvas = min(canvas_h / h, canvas_w / w)
        # 1.12 on (224,448), (224,672), (224,896); 1.49 on (448,448): the smallest upscale, least area
        (200, 300, False, (224, 448)),
        (200, 300, True, (448, 448)),  # the largest upscale
        # all downscale: 0.747 on (224,672) and (224,896), 0.56 on (448,448): the largest, least area
        (300, 800, False, (224, 672)),
        (1000, 1000, False, (448, 448)),  # all downscale; 448/1000 is the largest
        (100, 100, False, (224, 224)),  # 2.24 on (224,224), (224,448), (448,224): the smallest canvas
    ],
)
def test_best_fit_canvas(height, width, to_max, expected):
    resolutions = find_supported_resolutions(max_num_tiles=4, tile_size=224)
    image = torch.zeros(3, height, width)
    assert get_canvas_best_fit(image, resolutions, resize_to_max_canvas=to_max) == expected


def test_resize_with_pad_keeps_aspect_and_pads_bottom_right():
    image = torch.ones(3, 100, 50)
    out = resize_with_pad(image, (224, 224), resample="bilinear", max_size=None)
    assert out.shape == (3, 224, 224)
    # 100x50 -> 224x112: right half is padding
    assert out[:, :, :112].min() > 0.99 and out[:, :, 112:].abs().max() == 0
    # max_size limits upscaling to the tile size: 100x50 inside a (448, 224) canvas grows to at most 224 high
    out = resize_with_pad(image, (448, 224), resample="bilinear", max_size=224)
    assert out.shape == (3, 448, 224)
    assert out[:, :224, :112].min() > 0.99 and out[:, 224:].abs().max() == 0


def test_transform_tiles_aspect_ratio_and_normalization():
    transform = CLIPImageTransform(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], tile_size=8,
                                   max_num_tiles=4, dtype=torch.float32)
    pil = Image.new("RGB", (20, 10), color=(255, 255, 255))  # width 20, height 10
    out = transform({"image": pil})
    # canvas: scales (8,16): min(0.8, 0.8) = 0.8; (8,24): 0.8; (8, 32): 0.8 -> smallest area (8, 16)
    assert out["aspect_ratio"].tolist() == [1, 2]
    assert out["image"].shape == (2, 3, 8, 8)
    # white -> (1 - 0.5) / 0.5 = 1 inside the 8x16 resized image; nothing padded here
    torch.testing.assert_close(out["image"], torch.ones(2, 3, 8, 8))
    gray = Image.new("L", (8, 16), color=0)
    out = transform({"image": gray})
    assert out["aspect_ratio"].tolist() == [2, 1] and out["image"].shape == (2, 3, 8, 8)
    torch.testing.assert_close(out["image"], -torch.ones(2, 3, 8, 8))


def test_transform_uint8_output_keeps_pixel_values():
    """dtype=torch.uint8 without normalization: tiles hold 0..255, as torchtune's (not [0, 1] truncated to 0)."""
    transform = CLIPImageTransform(tile_size=8, max_num_tiles=1, dtype=torch.uint8)
    pixels = torch.arange(3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(3, 8, 8)
    out = transform({"image": pixels})  # already 8x8: no resize, no pad
    assert out["image"].dtype == torch.uint8
    assert torch.equal(out["image"], pixels[None])


@pytest.mark.parametrize("resample", ["nearest_exact", "nearest-exact", "NEAREST_EXACT", "bicubic"])
def test_transform_resample_spellings(resample):
    transform = CLIPImageTransform(tile_size=8, max_num_tiles=2, dtype=torch.float32, resample=resample)
    assert transform({"image": Image.new("RGB", (12, 5))})["image"].shape == (2, 3, 8, 8)


def test_transform_argument_checks_at_construction():
    with pytest.raises(ValueError, match="unknown resample 'lanczos5'"):
        CLIPImageTransform(tile_size=8, max_num_tiles=2, resample="lanczos5")
    with pytest.raises(ValueError, match="both or none of image_mean and image_std"):
        CLIPImageTransform(tile_size=8, max_num_tiles=2, image_std=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="both or none of image_mean and image_std"):
        CLIPImageTransform(tile_size=8, max_num_tiles=2, image_mean=[0.5, 0.5, 0.5])
    # An empty list of resolutions falls back to max_num_tiles, as torchtune.
    empty = CLIPImageTransform(tile_size=8, max_num_tiles=2, possible_resolutions=[])
    assert sorted(map(tuple, empty.possible_resolutions.tolist())) == [(8, 8), (8, 16), (16, 8)]


def test_transform_decodes_bytes_with_torchvision_and_reports_bad_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color=(0, 0, 0)).save(buf, format="PNG")
    transform = CLIPImageTransform(tile_size=8, max_num_tiles=2, dtype=torch.float32)
    out = transform({"image": buf.getvalue()})
    assert out["image"].shape == (1, 3, 8, 8) and out["aspect_ratio"].tolist() == [1, 1]
    with pytest.raises(DataError, match="cannot decode"):
        transform({"image": b"not an image"})
