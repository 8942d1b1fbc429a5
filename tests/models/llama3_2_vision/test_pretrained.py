"""``load_pretrained`` (vlm_finetune's ``pretrained`` key): a Hugging Face Llama-3.2-Vision folder and a
torchtune-key safetensors file load into the model exactly; LoRA adapters keep their initialisation; weights of
another shape are refused before anything is copied."""

import pytest
import torch
from safetensors.torch import save_file

from mmtrain.errors import ConfigError
from mmtrain.models.llama3_2_vision import llama3_2_vision_tiny, lora_llama3_2_vision_tiny
from mmtrain.models.llama3_2_vision._pretrained import load_pretrained

SHAPES = dict(max_num_tiles=2)  # HF's layout keeps tile embeddings, which the encoder has from 2 tiles up


def _random_tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    model = llama3_2_vision_tiny(**SHAPES)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # gates open, every tensor away from its initial value
    return model


def test_a_hugging_face_folder_loads_every_weight_exactly(tmp_path, write_tiny_mllama_folder) -> None:
    source = _random_tiny()
    write_tiny_mllama_folder(source, tmp_path)
    target = llama3_2_vision_tiny(**SHAPES)
    message = load_pretrained(target, tmp_path)
    assert "Hugging Face Llama-3.2-Vision checkpoint" in message
    expected, got = source.state_dict(), target.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_lora_model_takes_the_base_weights_and_keeps_its_adapters(tmp_path) -> None:
    source = _random_tiny()
    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    target = lora_llama3_2_vision_tiny(["q_proj", "v_proj"], **SHAPES)
    adapters_before = {k: v.clone() for k, v in target.state_dict().items() if ".lora_" in k}
    load_pretrained(target, tmp_path / "weights.safetensors")
    state = target.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    assert adapters_before and all(torch.equal(state[k], v) for k, v in adapters_before.items())
    assert all(not v.any() for k, v in adapters_before.items() if ".lora_b." in k)  # starts as the loaded model


def test_a_dora_model_sets_its_magnitudes_from_the_loaded_weights(tmp_path) -> None:
    """DoRA starts as the loaded model: magnitudes are the row norms of the loaded weights, not of the random ones
    the model was built with."""
    source = _random_tiny()
    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    target = lora_llama3_2_vision_tiny(["q_proj", "v_proj"], use_dora=True, **SHAPES)
    load_pretrained(target, tmp_path / "weights.safetensors")
    state, loaded = target.state_dict(), source.state_dict()
    magnitudes = [k for k in state if k.endswith(".magnitude")]
    assert "decoder.layers.1.fusion_layer.attn.q_proj.magnitude" in magnitudes
    for key in magnitudes:
        weight = loaded[key[: -len("magnitude")] + "weight"].double()
        torch.testing.assert_close(state[key].double(), weight.norm(dim=1), rtol=1e-6, atol=1e-6)


def test_weights_of_another_model_are_refused_before_copying(tmp_path) -> None:
    source = _random_tiny()
    weights = source.state_dict()
    target = llama3_2_vision_tiny(**SHAPES)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    save_file({k: v for k, v in weights.items() if k != "decoder.norm.scale"}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="1 of the model's weights missing \\(first: decoder.norm.scale\\)"):
        load_pretrained(target, tmp_path / "missing.safetensors")
    save_file({**weights, "decoder.extra": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ConfigError, match="1 not in the model \\(first: decoder.extra\\)"):
        load_pretrained(target, tmp_path / "extra.safetensors")
    bigger = llama3_2_vision_tiny(max_num_tiles=2, intermediate_dim=96).state_dict()
    save_file(bigger, str(tmp_path / "bigger.safetensors"))
    with pytest.raises(ConfigError, match=r"decoder.layers.0.mlp.w1.weight has shape \(96, 64\), the model \(128, 64\)"):
        load_pretrained(target, tmp_path / "bigger.safetensors")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no model.safetensors, no Meta consolidated.pth, and no config.json"):
        load_pretrained(target, tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_pretrained(target, tmp_path / "nowhere")
