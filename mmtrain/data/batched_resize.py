"""Crop-resize-flip of a batch of differently sized uint8 images in two batched matmuls (the device decoder's path).

Antialiased interpolation is separable: resizing a crop of ``(h, w)`` pixels to ``(S, S)`` is ``Wy @ crop @ Wx^T``
with ``Wy`` ``(S, h)`` and ``Wx`` ``(S, w)`` holding the filter weights of each output pixel, the same weights torch's
``interpolate(..., antialias=True)`` (and PIL) compute: centre ``scale (o + 1/2)``, support widened by ``scale`` when
shrinking, a triangle (bilinear) or Keys cubic with ``a = -1/2`` (bicubic) filter, weights cut to the crop and
normalized. A horizontal flip reverses ``Wx``'s rows. Per-image weights go into one zero-padded batch, so a batch of
``B`` crops costs ``B`` small copies and two matmuls instead of ``B`` separate resize calls (whose host overhead is
what limits a Python loop over a batch on the device).

Shapes: ``crops``: list of B uint8 ``(3, h_i, w_i)`` -> uint8 ``(B, 3, S, S)``. Values are rounded from float32
sums (after each pass, as torch's uint8 kernel does): they may differ by a level from that kernel's fixed point.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode

__all__ = ["resize_weights", "batched_resized_crop"]

_FILTER_SIZE = {InterpolationMode.BILINEAR: 2, InterpolationMode.BICUBIC: 4}
_CUBIC_A = -0.5


def _filter(x: torch.Tensor, interpolation: InterpolationMode) -> torch.Tensor:
    x = x.abs()
    if interpolation == InterpolationMode.BILINEAR:
        return (1.0 - x).clamp_min(0.0)
    a = _CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(lengths: torch.Tensor, out_size: int, padded: int, interpolation: InterpolationMode,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, out_size, padded)`` weights resizing each row of ``lengths[b]`` inputs to ``out_size`` outputs.

    Columns at or past ``lengths[b]`` are zero (the padding of shorter crops).
    """
    if interpolation not in _FILTER_SIZE:
        raise ValueError(f"batched resize supports bilinear and bicubic, not {interpolation.value}")
    lengths64 = lengths.to(torch.float64)[:, None, None]
    scale = lengths64 / out_size  # input pixels per output pixel
    shrinking = scale >= 1.0
    support = _FILTER_SIZE[interpolation] * 0.5 * torch.where(shrinking, scale, torch.ones_like(scale))
    inverse = torch.where(shrinking, 1.0 / scale, torch.ones_like(scale))
    out_index = torch.arange(out_size, dtype=torch.float64, device=lengths.device)[None, :, None]
    center = scale * (out_index + 0.5)
    # torch/PIL: taps [xmin, xmin + xsize) with xmin = trunc(center - support + 0.5) clamped to the input
    first = torch.trunc(center - support + 0.5).clamp_min(0)
    last = torch.minimum(torch.trunc(center + support + 0.5), lengths64)
    taps = torch.arange(padded, dtype=torch.float64, device=lengths.device)[None, None, :]
    weights = _filter((taps - center + 0.5) * inverse, interpolation)
    weights = torch.where((taps >= first) & (taps < last), weights, torch.zeros_like(weights))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype)


def batched_resized_crop(crops: list[torch.Tensor], size: int, flips: list[bool],
                         interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> torch.Tensor:
    """Resize each uint8 ``(3, h_i, w_i)`` crop to ``(3, size, size)`` (antialiased), flipping where ``flips`` says."""
    if not crops:
        raise ValueError("batched_resized_crop needs at least one crop")
    device = crops[0].device
    heights = torch.tensor([c.shape[-2] for c in crops], device=device)
    widths = torch.tensor([c.shape[-1] for c in crops], device=device)
    max_h, max_w = int(heights.max()), int(widths.max())
    batch = torch.zeros(len(crops), 3, max_h, max_w, dtype=torch.float32, device=device)
    for row, crop in enumerate(crops):
        batch[row, :, : crop.shape[-2], : crop.shape[-1]].copy_(crop)
    rows = resize_weights(heights, size, max_h, interpolation)  # (B, S, max_h)
    cols = resize_weights(widths, size, max_w, interpolation)  # (B, S, max_w)
    flip = torch.tensor(flips, dtype=torch.bool, device=device)[:, None, None]
    cols = torch.where(flip, cols.flip(1), cols)
    # Horizontal pass first, rounded and clamped to uint8 levels in between, as torch's uint8 kernel (and PIL) do:
    # it matters where bicubic overshoots.
    horizontal = (batch @ cols.transpose(-1, -2)[:, None]).round_().clamp_(0, 255)  # (B, 3, max_h, S)
    resized = rows[:, None] @ horizontal  # (B, 3, S, S)
    return resized.round_().clamp_(0, 255).to(torch.uint8)
