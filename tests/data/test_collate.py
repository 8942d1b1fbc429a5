"""Fusion collator: text, tiles, images, aspect ratios and cross-attention masks padded as torchtune does."""

import pytest
import torch

from mmtrain.data.collate import padded_collate_tiled_images_and_mask

TPT = 5  # tokens per tile


def _batch():
    return [
        {
            "tokens": [1, 2, 1, 3], "labels": [4, 5, 6, 7],
            "encoder_input": {"images": [torch.ones(2, 1, 1, 1), 2 * torch.ones(3, 1, 1, 1)],
                              "aspect_ratio": [torch.tensor([1, 2]), torch.tensor([1, 3])]},
            "encoder_mask": [torch.tensor([[1], [1], [0], [0]]).bool().expand(4, TPT * 2),
                             torch.tensor([[0], [0], [1], [1]]).bool().expand(4, TPT * 3)],
        },
        {
            "tokens": [1, 4], "labels": [8, 9],
            "encoder_input": {"images": [3 * torch.ones(4, 1, 1, 1)], "aspect_ratio": [torch.tensor([2, 2])]},
            "encoder_mask": [torch.ones(2, TPT * 4, dtype=torch.bool)],
        },
    ]


def test_page_example_shapes_and_padding():
    out = padded_collate_tiled_images_and_mask(_batch())
    assert out["tokens"].tolist() == [[1, 2, 1, 3], [1, 4, 0, 0]]
    assert out["labels"].tolist() == [[4, 5, 6, 7], [8, 9, -100, -100]]
    images = out["encoder_input"]["images"]
    assert images.shape == (2, 2, 4, 1, 1, 1)
    assert images[0, 0].flatten().tolist() == [1, 1, 0, 0]
    assert images[0, 1].flatten().tolist() == [2, 2, 2, 0]
    assert images[1, 0].flatten().tolist() == [3, 3, 3, 3]
    assert images[1, 1].flatten().tolist() == [0, 0, 0, 0]
    assert out["encoder_input"]["aspect_ratio"].tolist() == [[[1, 2], [1, 3]], [[2, 2], [1, 1]]]
    assert out["encoder_mask"].shape == (2, 4, 40)


def test_each_image_keeps_its_own_mask_block():
    # torchtune reshapes (bsz, n_imgs, seq, L) with .view(bsz, seq, -1), mixing images and rows for n_imgs > 1;
    # here column block j is image j's mask, row for row.
    mask = padded_collate_tiled_images_and_mask(_batch())["encoder_mask"]
    block = 4 * TPT
    first, second = mask[0, :, :block], mask[0, :, block:]
    assert first[:, : 2 * TPT].tolist() == [[True] * 10, [True] * 10, [False] * 10, [False] * 10]
    assert not first[:, 2 * TPT:].any()  # padding tiles
    assert second[:, : 3 * TPT].tolist() == [[False] * 15, [False] * 15, [True] * 15, [True] * 15]
    assert not second[:, 3 * TPT:].any()
    assert mask[1, :2, :block].all() and not mask[1, 2:].any() and not mask[1, :, block:].any()


def test_options_and_errors():
    out = padded_collate_tiled_images_and_mask(_batch(), pad_max_tiles=5, pad_max_images=3, pad_to_multiple_of=3,
                                               padding_idx=7, ignore_idx=-1)
    assert out["tokens"].shape == (2, 6) and out["tokens"][1].tolist() == [1, 4, 7, 7, 7, 7]
    assert out["labels"][1].tolist() == [8, 9, -1, -1, -1, -1]
    assert out["encoder_input"]["images"].shape == (2, 2, 5, 1, 1, 1)
    assert out["encoder_mask"].shape == (2, 6, 3 * 5 * TPT)
    left = padded_collate_tiled_images_and_mask(_batch(), pad_direction="left")
    assert left["tokens"].tolist() == [[1, 2, 1, 3], [0, 0, 1, 4]] and "labels" not in left
    assert left["encoder_mask"][1, 2:, : 4 * TPT].all() and not left["encoder_mask"][1, :2].any()
    with pytest.raises(ValueError, match="pad_direction"):
        padded_collate_tiled_images_and_mask(_batch(), pad_direction="up")
    with pytest.raises(ValueError, match="pad_max_tiles"):
        padded_collate_tiled_images_and_mask(_batch(), pad_max_tiles=3)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        padded_collate_tiled_images_and_mask(_batch(), pad_direction="left", pad_to_multiple_of=2)
    text_only = padded_collate_tiled_images_and_mask(
        [{"tokens": [1], "labels": [1], "encoder_input": {"images": [], "aspect_ratio": []}}])
    assert set(text_only) == {"tokens", "labels"}


def test_masks_padded_at_inference_collate_like_unpadded_ones():
    # VisionCrossAttentionMask(..., max_num_tiles=4)(sample, inference=True) pads each mask to 4 tiles' columns.
    own = torch.tensor([[0], [1], [1]]).bool().expand(3, 2 * TPT)
    padded = torch.cat([own, torch.zeros(3, 2 * TPT, dtype=torch.bool)], dim=1)

    def sample(mask):
        return {"tokens": [1, 2, 3], "encoder_input": {"images": [torch.ones(2, 1, 1, 1)],
                                                       "aspect_ratio": [torch.tensor([1, 2])]},
                "encoder_mask": [mask]}

    plain = padded_collate_tiled_images_and_mask([sample(own)], pad_direction="left")["encoder_mask"]
    assert plain.shape == (1, 3, 2 * TPT)
    assert torch.equal(padded_collate_tiled_images_and_mask([sample(padded)], pad_direction="left")["encoder_mask"],
                       plain)
    to_four = padded_collate_tiled_images_and_mask([sample(padded)], pad_max_tiles=4)
    assert to_four["encoder_input"]["images"].shape == (1, 1, 4, 1, 1, 1)
    assert torch.equal(to_four["encoder_mask"][0], padded)
    # A mask that is not the transform's block layout is taken as unpadded: 4 tiles' columns over 2 tiles.
    partial = padded.clone()
    partial[1, 2 * TPT] = True
    assert padded_collate_tiled_images_and_mask([sample(partial)])["encoder_mask"].shape == (1, 3, 4 * TPT)
    with pytest.raises(ValueError, match="image 0 in sample 1 has 10 columns per tile, an earlier one 5"):
        padded_collate_tiled_images_and_mask([sample(own), sample(partial)])


def test_inference_masks_from_the_transform_drive_the_fusion_model():
    from mmtrain.models.llama3_2_vision import llama3_2_vision_tiny
    from mmtrain.modules.transforms import VisionCrossAttentionMask

    torch.manual_seed(0)
    model = llama3_2_vision_tiny(max_num_tiles=4).eval()
    transform = VisionCrossAttentionMask(tile_size=32, patch_size=8, image_token_id=128, max_num_tiles=4)

    tiles = torch.rand(2, 3, 32, 32)  # a 1x2 canvas: 2 of the model's 4 tiles, 17 tokens each

    def collated(inference):
        sample = {"tokens": [5, 128, 6, 7], "encoder_input": {"images": [tiles], "aspect_ratio": [torch.tensor([1, 2])]}}
        sample = transform(sample, inference=inference)
        assert sample["encoder_mask"][0].shape == (4, (4 if inference else 2) * 17)
        return padded_collate_tiled_images_and_mask([sample], pad_direction="left")

    logits = []
    for inference in (False, True):
        batch = collated(inference)
        assert batch["encoder_mask"].shape == (1, 4, 2 * 17)
        with torch.no_grad():
            logits.append(model(batch["tokens"], encoder_input=batch["encoder_input"],
                                encoder_mask=batch["encoder_mask"]))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


def test_masks_widened_by_pad_max_images_drive_the_fusion_model():
    """pad_max_images widens encoder_mask for a fixed cache length; the model reads only the encoder's tokens."""
    from mmtrain.models.llama3_2_vision import llama3_2_vision_tiny
    from mmtrain.modules.transforms import VisionCrossAttentionMask

    torch.manual_seed(0)
    model = llama3_2_vision_tiny(max_num_tiles=4).eval()
    transform = VisionCrossAttentionMask(tile_size=32, patch_size=8, image_token_id=128)
    sample = {"tokens": [5, 128, 6, 7],
              "encoder_input": {"images": [torch.rand(2, 3, 32, 32)], "aspect_ratio": [torch.tensor([1, 2])]}}
    sample = transform(sample)
    logits = []
    for pad_max_images in (None, 3):
        batch = padded_collate_tiled_images_and_mask([dict(sample)], pad_direction="left", pad_max_tiles=4,
                                                     pad_max_images=pad_max_images)
        assert batch["encoder_mask"].shape == (1, 4, (pad_max_images or 1) * 4 * 17)
        with torch.no_grad():
            logits.append(model(batch["tokens"], encoder_input=batch["encoder_input"],
                                encoder_mask=batch["encoder_mask"]))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
