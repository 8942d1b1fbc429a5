"""Image transforms: eval normalization against a float64 reference, seeded crops, caption-aware flips."""

import random

import torch

from mmtrain.data.transforms import ContrastiveImageTransform, mentions_left_or_right


def _half_and_half(size=16):
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    image[0, :, : size // 2] = 255  # left half red
    image[2, :, size // 2 :] = 255  # right half blue
    return image


def test_mentions_left_or_right():
    assert mentions_left_or_right("a red circle left of a square")
    assert mentions_left_or_right("the dog on the RIGHT")
    assert not mentions_left_or_right("a small red circle above a large blue square")
    assert not mentions_left_or_right("a bright leftover cake")


def test_flip_only_when_caption_is_side_free():
    t = ContrastiveImageTransform(16, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=1.0,
                                  mean=(0, 0, 0), std=(1, 1, 1))
    image = _half_and_half()
    flipped = t(image, "a red square and a blue square", seed=0)
    kept = t(image, "a red square left of a blue square", seed=0)
    assert flipped[2, 0, 0] == 1.0 and flipped[0, 0, 0] == 0.0  # blue now on the left
    assert kept[0, 0, 0] == 1.0 and kept[2, 0, 0] == 0.0
    off = ContrastiveImageTransform(16, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, hflip_prob=1.0)
    assert torch.equal(off(image, "a dog", seed=0), off(image, "a dog left of a cat", seed=0))


def test_eval_transform_matches_float64_reference():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    t = ContrastiveImageTransform(8, train=False, mean=mean, std=std)
    image = torch.randint(0, 256, (3, 8, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = t(image)
    # Shorter side already 8: no resize, center crop of width 12 -> columns 2..9.
    ref = image[:, :, 2:10].double() / 255.0
    ref = (ref - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(std, dtype=torch.float64)[:, None, None]
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    assert t(torch.zeros(3, 20, 30, dtype=torch.uint8)).shape == (3, 8, 8)


def test_train_crop_is_a_function_of_the_seed():
    t = ContrastiveImageTransform(12, train=True, scale=(0.3, 0.6))
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    a = t(image, "x", seed=7)
    torch.manual_seed(456)  # the global RNG plays no part
    assert torch.equal(a, t(image, "x", seed=7))
    assert not torch.equal(a, t(image, "x", seed=8))
    assert a.shape == (3, 12, 12)


def test_unnormalized_then_pixel_normalizer_equals_normalized_transform():
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    t = ContrastiveImageTransform(12, train=True, scale=(0.3, 1.0), mean=mean, std=std)
    raw = t.unnormalized()
    assert t.normalize and not raw.normalize  # a copy: the original still normalizes
    images = [torch.randint(0, 256, (3, 20, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(4)]
    pixels = torch.stack([raw(image, "a cat", seed=i) for i, image in enumerate(images)])
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 12, 12)
    out = t.pixel_normalizer()(pixels)
    reference = (pixels.double() / 255.0 - torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference, atol=1e-6, rtol=0)
    # same crops and flips as the normalizing transform
    normalized = torch.stack([t(image, "a cat", seed=i) for i, image in enumerate(images)])
    torch.testing.assert_close(out, normalized, atol=1e-5, rtol=0)


def test_pixel_normalizer_refuses_float_input():
    import pytest

    with pytest.raises(TypeError, match="uint8"):
        ContrastiveImageTransform(8).pixel_normalizer()(torch.zeros(1, 3, 8, 8))


def test_pil_input_gives_the_result_of_its_tensor():
    import numpy as np
    import pytest
    from PIL import Image

    array = np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    image, tensor = Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1)
    transforms = [ContrastiveImageTransform(12, train=True, scale=(0.2, 1.0)),  # crops of many sizes and places
                  ContrastiveImageTransform(12, train=True, scale=(1.0, 1.0), ratio=(31 / 23, 31 / 23)),  # the frame
                  ContrastiveImageTransform(12, train=False)]
    assert transforms[1].crop_params(23, 31, random.Random(0)) == (0, 0, 23, 31)
    for t in transforms:
        for seed in range(8):
            assert torch.equal(t(image, "a cat", seed=seed), t(tensor, "a cat", seed=seed))
    with pytest.raises(ValueError, match="RGB"):
        ContrastiveImageTransform(12, train=True)(image.convert("L"), seed=0)
