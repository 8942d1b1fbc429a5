"""Parity with HF transformers' ALIGN: checkpoints written by one load in the other and give the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

from mmtrain.errors import CheckpointError
from mmtrain.models.align import AlignConfig, AlignModel, AlignTextModel, AlignVisionModel
from tests.models.align.conftest import tiny_config_dict

transformers = pytest.importorskip("transformers")


def _hf_model(seed: int = 0):
    from transformers import AlignConfig as HFAlignConfig
    from transformers import AlignModel as HFAlignModel

    torch.manual_seed(seed)
    model = HFAlignModel(HFAlignConfig(**tiny_config_dict())).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics so that eval-mode BN is exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 99, (3, 9), generator=g)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 4:] = 0
    token_type_ids = torch.zeros(3, 9, dtype=torch.long)
    token_type_ids[0, 5:] = 1
    pixel_values = torch.randn(3, 3, 33, 31, generator=g)  # odd sizes exercise the TF-style padding
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                pixel_values=pixel_values)


def _assert_same(ours, theirs, inputs):
    with torch.no_grad():
        a = ours(**inputs, return_loss=True)
        b = theirs(**inputs, return_loss=True)
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(a.vision_model_output.last_hidden_state, b.vision_model_output.last_hidden_state,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.text_model_output.pooler_output, b.text_model_output.pooler_output,
                               atol=1e-5, rtol=1e-5)


def test_hf_checkpoint_loads_and_matches(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    ours = AlignModel.from_pretrained(tmp_path).eval()
    assert ours.config.projection_dim == 32 and ours.config.vision_config.depthwise_padding == [2]
    inputs = _inputs()
    _assert_same(ours, hf, inputs)
    with torch.no_grad():
        features = ours.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        hf_features = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        torch.testing.assert_close(features, hf_features.pooler_output, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.get_image_features(inputs["pixel_values"]),
                                   hf.get_image_features(inputs["pixel_values"]).pooler_output, atol=1e-5, rtol=1e-5)
        # dual-encoder interface agrees with forward()
        out = ours(**inputs)
        torch.testing.assert_close(ours.encode_image(inputs["pixel_values"]), out.image_embeds)
        torch.testing.assert_close(ours.encode_text(inputs["input_ids"], inputs["attention_mask"]),
                                   torch.nn.functional.normalize(features, dim=-1))
        torch.testing.assert_close(ours.get_logit_scale(), 1 / hf.temperature)


def test_mmtrain_checkpoint_loads_in_hf(tmp_path, tiny_config):
    from transformers import AlignModel as HFAlignModel

    torch.manual_seed(0)
    ours = AlignModel(tiny_config).eval()
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "align" and saved["text_config"]["model_type"] == "align_text_model"
    hf = HFAlignModel.from_pretrained(tmp_path).eval()
    _assert_same(ours, hf, _inputs(seed=3))


def test_towers_load_from_full_checkpoint_and_bin(tmp_path):
    hf = _hf_model(seed=4)
    hf.save_pretrained(tmp_path, safe_serialization=False) if _bin_supported() else hf.save_pretrained(tmp_path)
    inputs = _inputs()
    text = AlignTextModel.from_pretrained(tmp_path).eval()
    vision = AlignVisionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        hf_text = hf.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        ours_text = text(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        torch.testing.assert_close(ours_text.last_hidden_state, hf_text.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vision(inputs["pixel_values"]).pooler_output,
                                   hf.vision_model(inputs["pixel_values"]).pooler_output, atol=1e-5, rtol=1e-5)


def _bin_supported() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def test_pytorch_model_bin_roundtrip_and_errors(tmp_path, tiny_config):
    torch.manual_seed(0)
    ours = AlignModel(tiny_config).eval()
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").exists()
    back = AlignModel.from_pretrained(tmp_path / "bin").eval()
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits_per_text, ours(**inputs).logits_per_text)
    # a file that pickles code is refused by weights_only=True, with a one-line CheckpointError
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text((tmp_path / "bin" / "config.json").read_text())
    torch.save({"x": _Evil()}, tmp_path / "evil" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read weights"):
        AlignModel.from_pretrained(tmp_path / "evil")
    # weights that do not fit the config
    config = AlignConfig(**{**tiny_config_dict(), "text_config": {**tiny_config_dict()["text_config"],
                                                                  "hidden_size": 48}})
    with pytest.raises(CheckpointError, match="shape"):
        AlignModel.from_pretrained(tmp_path / "bin", config=config)
    with pytest.raises(CheckpointError, match="no config.json"):
        AlignModel.from_pretrained(tmp_path / "evil" / "..")


class _Evil:
    pass
