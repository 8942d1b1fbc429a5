"""The tiled CLIP image transform (torchtune's ``CLIPImageTransform``).

Steps: decode to an RGB (3, h, w) tensor in [0, 1] -> choose the best-fitting canvas among the resolutions allowed
by ``max_num_tiles`` -> resize without distortion (limited upscaling) -> pad bottom/right -> normalize ->
``tile_crop``. Output: ``image`` (n_tiles, 3, tile_size, tile_size) and ``aspect_ratio`` (2,) long = the canvas's
(rows, cols) of tiles.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF

from mmtrain.errors import DataError
from mmtrain.modules.transforms.vision_utils import (
    find_supported_resolutions,
    get_canvas_best_fit,
    resize_with_pad,
    tile_crop,
)
from mmtrain.modules.transforms.vision_utils.resize_with_pad import interpolation_mode

__all__ = ["CLIPImageTransform", "decode_image"]


def decode_image(image: Any) -> torch.Tensor:
    """PIL image, path, encoded bytes or a (c, h, w) tensor -> (3, h, w) uint8 or float tensor, decoded with
    torchvision (grayscale and RGBA become RGB).

    Raises:
        DataError: when the bytes or file cannot be decoded, naming the file when there is one.
    """
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    if isinstance(image, torch.Tensor):
        tensor = image
    elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        where = str(image) if isinstance(image, (str, os.PathLike)) else "image bytes"
        try:
            if isinstance(image, (str, os.PathLike)):
                with open(image, "rb") as f:
                    data = f.read()
            else:
                data = bytes(image)
            with warnings.catch_warnings():  # torchvision >= 0.29 flags its decoders as deprecated; they still work
                warnings.simplefilter("ignore", DeprecationWarning)
                tensor = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (OSError, RuntimeError, ValueError) as err:
            raise DataError(f"{where}: cannot decode image ({str(err).splitlines()[0] if str(err) else err})") from err
    else:  # PIL image
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        tensor = TF.pil_to_tensor(image)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 4:
        tensor = tensor[:3]
    return tensor


class CLIPImageTransform:
    """Tile an image for a tiled CLIP encoder.

    Args:
        image_mean, image_std: per-channel normalization (none when None).
        possible_resolutions: candidate canvases (h, w); by default every grid of at most ``max_num_tiles`` tiles.
        tile_size: tile side in pixels.
        max_num_tiles: most tiles per image (used when ``possible_resolutions`` is None).
        dtype: output dtype.
        resample: interpolation ("bilinear", "bicubic", "nearest", ...).
        resize_to_max_canvas: upscale to the largest fitting canvas instead of the smallest.

    ``__call__(sample, inference=False)``: ``sample["image"]`` -> ``sample["image"]`` (n_tiles, 3, tile, tile) and
    ``sample["aspect_ratio"]`` long (2,).
    """

    def __init__(
        self,
        *,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        possible_resolutions: list[tuple[int, int]] | None = None,
        tile_size: int = 224,
        max_num_tiles: int | None = 4,
        dtype: torch.dtype = torch.bfloat16,
        resample: str = "bilinear",
        resize_to_max_canvas: bool = False,
    ) -> None:
        if not possible_resolutions and max_num_tiles is None:
            raise ValueError("Either possible_resolutions or max_num_tiles must be given")
        if (image_mean is None) != (image_std is None):
            raise ValueError(f"Need to provide both or none of image_mean and image_std. Got image_mean={image_mean} "
                             f"and image_std={image_std}")
        if not possible_resolutions:  # None or empty: every grid of at most max_num_tiles tiles, as torchtune
            possible_resolutions = find_supported_resolutions(max_num_tiles=max_num_tiles, tile_size=tile_size)
        self.possible_resolutions = torch.tensor(possible_resolutions).reshape(-1, 2)
        self.max_num_tiles = max_num_tiles
        self.image_mean = image_mean
        self.image_std = image_std
        self.tile_size = tile_size
        self.dtype = dtype
        self.resample = interpolation_mode(resample)  # as torchtune: the enum; an unknown name fails here
        self.resize_to_max_canvas = resize_to_max_canvas

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        image = decode_image(sample["image"])
        image = TF.to_dtype(image, dtype=torch.float32, scale=True)
        best_resolution = get_canvas_best_fit(image, self.possible_resolutions, self.resize_to_max_canvas)
        image = resize_with_pad(
            image, best_resolution, resample=self.resample,
            max_size=None if self.resize_to_max_canvas else self.tile_size,
        )
        if self.image_mean:
            image = TF.normalize(image, mean=self.image_mean, std=self.image_std)
        # An integer dtype without normalization keeps pixel values (0..255 for uint8), as torchtune's transform.
        image = image.to(self.dtype) if self.dtype.is_floating_point else TF.to_dtype(image, self.dtype, scale=True)
        tiles = tile_crop(image, tile_size=self.tile_size)
        aspect_ratio = torch.tensor(best_resolution).reshape(-1) // self.tile_size
        sample.update({"image": tiles, "aspect_ratio": aspect_ratio})  # type: ignore[attr-defined]
        return sample
