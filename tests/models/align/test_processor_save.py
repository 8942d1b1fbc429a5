"""AlignProcessor.save_pretrained / from_pretrained: our round trip, and interchange with HF transformers' folders.

The tokenizer vocabulary is a tiny WordPiece vocab written by the test (no downloads).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmtrain.errors import CheckpointError
from mmtrain.models.align import AlignProcessor, BertTokenizer, EfficientNetImageProcessor
from mmtrain.models.align.processing import ALIGN_BASE_IMAGE_PROCESSOR

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "two", "red", "square", "##s",
         ",", "!", "left", "the", "circle", "Red", "Two"]
TEXTS = ["a photo of a cat", "Two RED squares, left of the Red circle!", "dog"]
# Not align-base's defaults, so a reader that ignored the saved file would give different pixels.
IMAGE_SETTINGS = dict(size={"height": 40, "width": 44}, resample=3, do_center_crop=True,
                      crop_size={"height": 32, "width": 30}, do_rescale=True, rescale_factor=1 / 255,
                      rescale_offset=False, do_normalize=True, image_mean=[0.48, 0.46, 0.41],
                      image_std=[0.27, 0.26, 0.28], include_top=True)
# The keys HF's EfficientNetImageProcessor writes (transformers 4.x preprocessor_config.json, 5.x nested entry).
HF_IMAGE_KEYS = {"image_processor_type", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                 "rescale_factor", "rescale_offset", "do_normalize", "image_mean", "image_std", "include_top"}


def _vocab_dir(path: pathlib.Path, do_lower_case: bool = True) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": do_lower_case, "model_max_length": 128}))
    return path


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 70), (61, 45))]


def _processor(tmp_path: pathlib.Path, do_lower_case: bool = True) -> AlignProcessor:
    tokenizer = BertTokenizer.from_pretrained(_vocab_dir(tmp_path / "vocab", do_lower_case))
    return AlignProcessor(EfficientNetImageProcessor(**IMAGE_SETTINGS), tokenizer)


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=atol, rtol=atol)


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_round_trip_writes_hf_layout_and_reads_back_identically(tmp_path, do_lower_case):
    ours = _processor(tmp_path, do_lower_case)
    written = ours.save_pretrained(tmp_path / "saved")
    names = {pathlib.Path(p).name for p in written}
    assert names == {"preprocessor_config.json", "processor_config.json", "tokenizer.json", "vocab.txt",
                     "tokenizer_config.json", "special_tokens_map.json"}
    saved = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    assert set(saved) == HF_IMAGE_KEYS | {"processor_class"}
    assert saved["image_processor_type"] == "EfficientNetImageProcessor" and saved["processor_class"] == "AlignProcessor"
    assert saved["size"] == {"height": 40, "width": 44} and saved["rescale_factor"] == 1 / 255
    nested = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert nested["processor_class"] == "AlignProcessor" and set(nested["image_processor"]) == HF_IMAGE_KEYS
    assert (tmp_path / "saved" / "vocab.txt").read_text(encoding="utf-8").splitlines() == VOCAB
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is do_lower_case and config["model_max_length"] == 128
    assert config["tokenizer_class"] == "BertTokenizer" and config["pad_token"] == "[PAD]"
    assert json.loads((tmp_path / "saved" / "special_tokens_map.json").read_text())["cls_token"] == "[CLS]"

    loaded = AlignProcessor.from_pretrained(tmp_path / "saved")
    assert vars(loaded.image_processor) == vars(ours.image_processor)
    assert loaded.tokenizer.do_lower_case is do_lower_case and loaded.tokenizer.model_max_length == 128
    a = ours(text=TEXTS, images=_images(), return_tensors="pt")
    b = loaded(text=TEXTS, images=_images(), return_tensors="pt")
    _assert_same(a, b)
    assert a["pixel_values"].shape == (2, 3, 32, 30) and a["input_ids"].shape == (3, 64)
    # cased vocab: "Red" is its own token only when the text is not lowercased
    red_cased = VOCAB.index("Red") in a["input_ids"][1].tolist()
    assert red_cased is (not do_lower_case)
    assert loaded.batch_decode(b["input_ids"], skip_special_tokens=True) == \
        ours.batch_decode(a["input_ids"], skip_special_tokens=True)


def test_saved_settings_are_applied_float64_reference(tmp_path):
    _processor(tmp_path).save_pretrained(tmp_path / "saved")
    image_processor = EfficientNetImageProcessor.from_pretrained(tmp_path / "saved")
    level = 200  # a flat image stays flat through resize and crop, so the value is the rescale/normalize chain
    pixels = image_processor(Image.new("RGB", (70, 50), (level, level, level)), return_tensors="pt")["pixel_values"]
    mean = torch.tensor(IMAGE_SETTINGS["image_mean"], dtype=torch.float64)
    std = torch.tensor(IMAGE_SETTINGS["image_std"], dtype=torch.float64)
    expected = ((level / 255 - mean) / std) / std  # include_top divides by std once more
    assert pixels.shape == (1, 3, 32, 30)
    torch.testing.assert_close(pixels[0].double(), expected[:, None, None].expand(3, 32, 30), atol=1e-5, rtol=1e-5)


def test_hf_reads_our_folder(tmp_path):
    from transformers import AlignProcessor as HFAlignProcessor

    ours = _processor(tmp_path)
    ours.save_pretrained(tmp_path / "saved")
    hf = HFAlignProcessor.from_pretrained(tmp_path / "saved")
    assert type(hf.image_processor).__name__.startswith("EfficientNetImageProcessor")
    assert hf.image_processor.include_top is True and hf.image_processor.resample == 3
    a = ours(text=TEXTS, images=_images(), return_tensors="pt", truncation=True)
    b = hf(text=TEXTS, images=_images(), return_tensors="pt", padding="max_length", max_length=64, truncation=True)
    _assert_same(a, b, atol=1e-5)


def test_we_read_hf_saved_folder(tmp_path):
    from transformers import AlignProcessor as HFAlignProcessor
    from transformers import BertTokenizerFast
    from transformers import EfficientNetImageProcessor as HFImageProcessor

    settings = {**ALIGN_BASE_IMAGE_PROCESSOR, "size": {"height": 36, "width": 34},
                "crop_size": {"height": 30, "width": 28}}
    hf = HFAlignProcessor(HFImageProcessor(**settings), BertTokenizerFast.from_pretrained(_vocab_dir(tmp_path / "v")))
    hf.save_pretrained(tmp_path / "hf")
    ours = AlignProcessor.from_pretrained(tmp_path / "hf")
    assert ours.image_processor.size == {"height": 36, "width": 34} and ours.image_processor.rescale_offset is True
    a = ours(text=TEXTS, images=_images(), return_tensors="pt", truncation=True)
    b = hf(text=TEXTS, images=_images(), return_tensors="pt", padding="max_length", max_length=64, truncation=True)
    _assert_same(a, b, atol=1e-5)
    assert a["pixel_values"].min() >= -1 and a["pixel_values"].max() <= 1  # align-base: x / 127.5 - 1


def test_processor_config_takes_precedence_and_bad_files_name_the_file(tmp_path):
    ours = _processor(tmp_path)
    ours.save_pretrained(tmp_path / "saved")
    # transformers 5.x reads processor_config.json's entry first; a stale preprocessor_config.json is ignored
    (tmp_path / "saved" / "preprocessor_config.json").write_text(json.dumps({**IMAGE_SETTINGS, "include_top": False}))
    assert AlignProcessor.from_pretrained(tmp_path / "saved").image_processor.include_top is True
    (tmp_path / "saved" / "processor_config.json").unlink()
    assert AlignProcessor.from_pretrained(tmp_path / "saved").image_processor.include_top is False
    (tmp_path / "saved" / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="preprocessor_config.json: cannot read JSON"):
        AlignProcessor.from_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "preprocessor_config.json").write_text(json.dumps({"resample": 9}))
    with pytest.raises(CheckpointError, match="bad image processor settings"):
        AlignProcessor.from_pretrained(tmp_path / "saved")
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        EfficientNetImageProcessor.from_pretrained(tmp_path / "vocab")
