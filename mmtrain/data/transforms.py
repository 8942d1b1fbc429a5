"""Image transforms for contrastive training, on torchvision v2 functionals.

    transform = ContrastiveImageTransform(224, train=True)
    pixels = transform(image, caption, seed=1234)   # image: PIL or uint8 (3, H, W) -> float (3, 224, 224)

    raw = transform.unnormalized()                   # same crops and flips -> uint8 (3, 224, 224)
    normalize = transform.pixel_normalizer()         # uint8 (B, 3, H, W) on any device -> float (B, 3, H, W)

Train: random resized crop, then a horizontal flip with probability ``hflip_prob`` but only when the caption
says nothing of left or right (flipping "a dog left of a cat" would make the caption false), then normalize.
Eval: resize the shorter side to ``image_size``, center crop, normalize.

Normalizing on the training device instead of in the DataLoader workers moves uint8 pixels from the workers to
the GPU: a quarter of the bytes through shared memory, pinning and the host-to-device copy (the recipe's
``normalize_on_device``).

The random draws come from a ``random.Random(seed)`` per call, not from torch's global RNG: a sample's
augmentation depends only on (seed, epoch, index), whatever the worker, rank count or resume point.
"""

from __future__ import annotations

import copy
import math
import random
import re
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mmtrain.errors import ConfigError

# ALIGN's processor maps pixels to [-1, 1] (rescale 1/127.5, offset -1): mean 0.5, std 0.5.
ALIGN_MEAN = (0.5, 0.5, 0.5)
ALIGN_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIDE_WORDS = re.compile(r"\b(left|right|lefts|rights|leftmost|rightmost|leftward|rightward|leftwards|rightwards)\b", re.IGNORECASE)


def mentions_left_or_right(text: str) -> bool:
    """True when a caption names a horizontal side, so a horizontal flip would contradict it."""
    return bool(_SIDE_WORDS.search(text))


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2 or values[0] > values[1] or values[0] <= 0:
        raise ConfigError(f"dataset.transform.{name}: expected [low, high] with 0 < low <= high, got {list(value)}")
    return values  # type: ignore[return-value]


class ContrastiveImageTransform:
    """``(image, text="", seed=None) -> float (3, image_size, image_size)`` normalized pixels.

    Args:
        image_size: output side.
        train: augment (random resized crop + caption-aware flip) or not (resize + center crop).
        scale, ratio: RandomResizedCrop's area fraction and aspect-ratio ranges.
        hflip: allow horizontal flips (still never for captions naming left/right).
        hflip_prob: flip probability where allowed.
        mean, std: per-channel normalization of pixels in [0, 1].
        interpolation: "bilinear" or "bicubic".
        normalize: False returns the uint8 (3, image_size, image_size) pixels before normalization, to be
            normalized later by :meth:`pixel_normalizer` (on the GPU).
    """

    def __init__(
        self,
        image_size: int,
        *,
        train: bool = False,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        hflip_prob: float = 0.5,
        mean: Sequence[float] = ALIGN_MEAN,
        std: Sequence[float] = ALIGN_STD,
        interpolation: str = "bilinear",
        normalize: bool = True,
    ) -> None:
        if int(image_size) < 1:
            raise ConfigError(f"dataset.image_size: must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.scale = _pair(scale, "scale")
        if self.scale[1] > 1:
            raise ConfigError(f"dataset.transform.scale: area fraction above 1: {list(scale)}")
        self.ratio = _pair(ratio, "ratio")
        self.hflip = bool(hflip)
        self.hflip_prob = float(hflip_prob)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"dataset.transform: mean/std need 3 values and std > 0, got {mean} / {std}")
        try:
            self.interpolation = InterpolationMode(interpolation)
        except ValueError:
            raise ConfigError(f"dataset.transform.interpolation: unknown {interpolation!r}") from None
        self.normalize = bool(normalize)

    def unnormalized(self) -> ContrastiveImageTransform:
        """A copy with the same geometry and randomness that returns uint8 pixels (normalize later, on device)."""
        raw = copy.copy(self)
        raw.normalize = False
        return raw

    def pixel_normalizer(self) -> PixelNormalize:
        """What :meth:`unnormalized` leaves out: uint8 (B, 3, H, W) -> this transform's float pixels."""
        return PixelNormalize(self.mean, self.std)

    def crop_params(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, h, w) as RandomResizedCrop samples them (10 tries, then a center crop)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def flip_allowed(self, text: str) -> bool:
        return self.hflip and not mentions_left_or_right(text)

    def __call__(self, image: Image.Image | torch.Tensor, text: str = "", seed: int | None = None) -> torch.Tensor:
        if isinstance(image, Image.Image):
            width, height = image.size
        else:
            _check_rgb(image)
            height, width = image.shape[-2:]
        size = [self.image_size, self.image_size]
        if self.train:
            rng = random.Random(seed)
            top, left, h, w = self.crop_params(height, width, rng)
            pixels = image
            if isinstance(image, Image.Image):
                # Only the crop becomes a tensor: converting the whole decoded frame cost a third of the time of
                # the resize, for pixels the crop then dropped.
                if (h, w) != (height, width):
                    image = image.crop((left, top, left + w, top + h))
                    top = left = 0
                pixels = _check_rgb(F.pil_to_tensor(image))
            if (h, w) == (height, width) and (height, width) == (self.image_size, self.image_size):
                out = pixels  # full-size crop of an image already at the output size: nothing to resample
            else:
                out = F.resized_crop(pixels, top, left, h, w, size, interpolation=self.interpolation, antialias=True)
            flip = rng.random() < self.hflip_prob
            if flip and self.flip_allowed(text):
                out = F.horizontal_flip(out)
        else:
            out = _check_rgb(F.pil_to_tensor(image)) if isinstance(image, Image.Image) else image
            if min(height, width) != self.image_size:
                out = F.resize(out, self.image_size, interpolation=self.interpolation, antialias=True)
            if tuple(out.shape[-2:]) != (self.image_size, self.image_size):
                out = F.center_crop(out, size)
        if not self.normalize:
            return out.contiguous()
        out = out.to(torch.float32).div_(255.0)
        return F.normalize(out, self.mean, self.std, inplace=True)

    def __repr__(self) -> str:
        kind = f"train, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}" if self.train else "eval"
        return f"ContrastiveImageTransform({self.image_size}, {kind}, mean={self.mean}, std={self.std})"


def _check_rgb(pixels: torch.Tensor) -> torch.Tensor:
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected an RGB image (3, H, W), got shape {tuple(pixels.shape)}")
    return pixels


class PixelNormalize:
    """uint8 pixels (..., 3, H, W) on any device -> float32 ``(x / 255 - mean) / std``, as one multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            raise TypeError(f"PixelNormalize expects uint8 pixels, got {pixels.dtype}")
        if pixels.device not in self._cache:
            std = torch.tensor(self.std, dtype=torch.float64)
            scale = (1.0 / (255.0 * std)).to(torch.float32).view(3, 1, 1)
            shift = (-torch.tensor(self.mean, dtype=torch.float64) / std).to(torch.float32).view(3, 1, 1)
            self._cache[pixels.device] = (scale.to(pixels.device), shift.to(pixels.device))
        scale, shift = self._cache[pixels.device]
        return torch.addcmul(shift, pixels.to(torch.float32), scale)

    def __repr__(self) -> str:
        return f"PixelNormalize(mean={self.mean}, std={self.std})"


def build_image_transform(image_size: int, *, train: bool, **kwargs) -> ContrastiveImageTransform:
    """Config builder for :class:`ContrastiveImageTransform`."""
    return ContrastiveImageTransform(image_size, train=train, **kwargs)
