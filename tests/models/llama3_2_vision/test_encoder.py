"""llama3_2_vision_encoder: shapes, torchtune's key layout, the hidden-state concatenation order, the 11B preset,
and the benchmark's smoke mode."""

import json

import pytest
import torch
import torch.nn.functional as F

from mmtrain.errors import ConfigError
from mmtrain.models.llama3_2_vision._component_builders import (
    llama3_2_vision_11b_encoder,
    llama3_2_vision_encoder,
)

TINY = dict(patch_size=2, num_heads=2, clip_embed_dim=8, clip_num_layers=2, clip_hidden_states=[0, 1],
            num_layers_projection=1, decoder_embed_dim=6, tile_size=4, max_num_tiles=2)

# torchtune: the projection head's keys (layer 0) and output, under "projection."
PROJECTION_KEYS = [
    "projection.layers.0.attn.q_proj.weight", "projection.layers.0.attn.k_proj.weight",
    "projection.layers.0.attn.v_proj.weight", "projection.layers.0.attn.output_proj.weight",
    "projection.layers.0.mlp.w1.weight", "projection.layers.0.mlp.w1.bias",
    "projection.layers.0.mlp.w2.weight", "projection.layers.0.mlp.w2.bias",
    "projection.layers.0.sa_norm.weight", "projection.layers.0.sa_norm.bias",
    "projection.layers.0.mlp_norm.weight", "projection.layers.0.mlp_norm.bias",
    "projection.layers.0.sa_scale.scale", "projection.layers.0.mlp_scale.scale",
    "projection.output.weight", "projection.output.bias",
]


def test_keys_shapes_and_output():
    model = llama3_2_vision_encoder(**TINY)
    sd = model.state_dict()
    assert sorted(k for k in sd if k.startswith("projection.")) == sorted(PROJECTION_KEYS)
    assert "clip.layers.1.attn.q_proj.weight" in sd and "clip.layers.0.attn.q_proj.bias" not in sd  # no attn bias
    assert "clip.token_pos_embedding.global_token_positional_embedding" in sd
    assert sd["projection.output.weight"].shape == (6, 8 * 3)
    model.load_state_dict({k: torch.randn(v.shape) for k, v in sd.items()}, strict=True)
    out = model(torch.randn(2, 3, 2, 3, 4, 4), torch.tensor([[1, 2]]).expand(2, 3, 2))
    assert out.shape == (2, 3 * 2 * 5, 6)
    assert len(model.layer_modules()) == 3


def test_projection_concatenates_hidden_states_interleaved_like_torchtune():
    torch.manual_seed(0)
    model = llama3_2_vision_encoder(**TINY).double()
    with torch.no_grad():
        for p in model.projection.parameters():
            p.copy_(torch.randn_like(p))
    images = torch.randn(1, 1, 2, 3, 4, 4, dtype=torch.float64)
    aspect = torch.tensor([[[1, 2]]])
    x, hidden = model.clip(images, aspect)
    h = x.reshape(1, 10, 8)
    for layer in model.projection.layers:
        h = layer(h)
    # torchtune: stack hidden states on a new last axis, then flatten (d, n_hidden) -> features [d0h0, d0h1, ...]
    feats = [h.reshape(10, 8)]
    flat_hidden = torch.stack([hs.reshape(10, 8) for hs in hidden], dim=-1).reshape(10, 16)
    feats.append(flat_hidden)
    expected = F.linear(torch.cat(feats, dim=-1), model.projection.output.weight, model.projection.output.bias)
    torch.testing.assert_close(model(images, aspect), expected[None])
    torch.testing.assert_close(flat_hidden[:, 1], hidden[1].reshape(10, 8)[:, 0])


def test_11b_preset_shapes_on_meta():
    with torch.device("meta"):
        model = llama3_2_vision_11b_encoder()
    clip = model.clip
    assert clip.conv.weight.shape == (1280, 3, 14, 14)
    assert clip.get_image_tokens_per_tile() == 1601
    assert len(clip.layers) == 32 and clip.out_indices == [3, 7, 15, 23, 30]
    assert len(model.projection.layers) == 8
    assert model.projection.output.weight.shape == (4096, 1280 * 6)
    assert clip.token_pos_embedding.global_token_positional_embedding.shape == (4, 4, 1601, 1280)


def test_bench_default_runs_fa4_only_where_it_loads_on_a_hopper_gpu(tmp_path):
    from mmtrain.bench.vision_encoder import main

    out = tmp_path / "vision_encoder.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    assert [r["sdpa_backend"] for r in json.loads(out.read_text())["results"]] == ["auto"]  # CPU: torch's order only


def test_bench_smoke(tmp_path):
    from mmtrain.bench.vision_encoder import main

    out = tmp_path / "vision_encoder.json"
    assert main(["--smoke", "--sdpa-backends", "auto,cudnn", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    assert [r["name"] for r in report["results"]] == ["mmtrain eager", "mmtrain eager [cudnn]"]
    for result in report["results"]:
        assert result["tiles_per_s"] > 0 and result["flops_per_step"] > 0
    assert [r["sdpa_backend"] for r in report["results"]] == ["auto", "cudnn"]
    # both kernels preferences compute the same thing: CPU falls back past cuDNN
    assert report["results"][0]["flops_per_step"] == report["results"][1]["flops_per_step"]


def test_bench_rejects_an_unknown_inductor_mode_before_running(tmp_path):
    from mmtrain.bench.vision_encoder import main

    out = tmp_path / "vision_encoder.json"
    with pytest.raises(ConfigError, match="--inductor-modes: unknown fastest; expected default"):
        main(["--smoke", "--inductor-modes", "default,fastest", "--out", str(out)])
    assert not out.exists()
