"""The device decoder's batched crop-resize-flip equals per-image antialiased resizing: against a float64 reference
written out pixel by pixel here, and within one level of torchvision's uint8 kernel (what the workers use)."""

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mmtrain.data.batched_resize import batched_resized_crop, resize_weights


def _tap(x, interpolation):
    x = abs(x)
    if interpolation == InterpolationMode.BILINEAR:
        return max(0.0, 1.0 - x)
    a = -0.5
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


def _weights_1d(length, out_size, interpolation):
    """PIL's antialiased resampling weights, one output pixel at a time."""
    scale = length / out_size
    half_width = (1.0 if interpolation == InterpolationMode.BILINEAR else 2.0) * max(scale, 1.0)
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    rows = []
    for o in range(out_size):
        center = scale * (o + 0.5)
        first = max(int(center - half_width + 0.5), 0)
        last = min(int(center + half_width + 0.5), length)
        row = [0.0] * length
        for j in range(first, last):
            row[j] = _tap((j - center + 0.5) * inverse, interpolation)
        total = sum(row)
        rows.append([w / total for w in row])
    return torch.tensor(rows, dtype=torch.float64)


def _reference(crop, size, flip, interpolation):
    rows = _weights_1d(crop.shape[-2], size, interpolation)
    cols = _weights_1d(crop.shape[-1], size, interpolation)
    if flip:
        cols = cols.flip(0)
    horizontal = (crop.double() @ cols.T).round().clamp(0, 255)
    return (rows @ horizontal).round().clamp(0, 255)


@pytest.mark.parametrize("interpolation", [InterpolationMode.BILINEAR, InterpolationMode.BICUBIC])
def test_batched_resize_equals_the_plain_reference_and_torchvision(interpolation):
    torch.manual_seed(0)
    shapes = [(40, 31), (12, 12), (5, 17), (61, 60), (3, 4)]  # shrink, identity, mixed, shrink, enlarge
    crops = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in shapes]
    flips = [False, True, False, True, True]
    out = batched_resized_crop(crops, 12, flips, interpolation)
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 12, 12)
    for crop, flip, got in zip(crops, flips, out):
        expected = _reference(crop, 12, flip, interpolation)
        assert (got.double() - expected).abs().max() <= 1  # float32 vs float64 sums may round apart at .5
        torchvision = F.resize(crop, [12, 12], interpolation=interpolation, antialias=True)
        torchvision = F.horizontal_flip(torchvision) if flip else torchvision
        assert (got.int() - torchvision.int()).abs().max() <= 1
    identity = out[1].flip(-1)  # 12 x 12 to 12 x 12 (flipped back): the pixels themselves
    assert torch.equal(identity, crops[1])


def test_resize_weights_are_normalized_and_zero_on_padding():
    weights = resize_weights(torch.tensor([7, 20]), 5, 20, InterpolationMode.BILINEAR, dtype=torch.float64)
    assert weights.shape == (2, 5, 20)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    assert torch.all(weights[0, :, 7:] == 0)
    torch.testing.assert_close(weights[1], _weights_1d(20, 5, InterpolationMode.BILINEAR))
    with pytest.raises(ValueError, match="bilinear and bicubic"):
        resize_weights(torch.tensor([4]), 2, 4, InterpolationMode.NEAREST)


def test_device_decoder_batched_path_matches_the_per_image_path(tmp_path):
    from tests.data.test_device_decode import _folder, _host_batches, _loader

    dataset = _folder(tmp_path, ["jpeg", "gray", "jpeg", "png", "jpeg", "jpeg", "jpeg", "gray"])
    loader = _loader(dataset, True)
    exact = _host_batches(loader)
    loader.device_decoder.batched, loader.device_decoder.chunk = True, 3  # chunks of 3: the seams are covered
    batched = _host_batches(loader)
    assert len(exact) == len(batched) == 1 and not math.isnan(float(exact[0]["pixel_values"].float().mean()))
    assert torch.equal(exact[0]["index"], batched[0]["index"])
    difference = (exact[0]["pixel_values"].int() - batched[0]["pixel_values"].int()).abs()
    # A level apart after the first pass can become two after the second; rare either way.
    assert difference.max() <= 2 and difference.float().mean() < 0.1, (difference.max(), difference.float().mean())
