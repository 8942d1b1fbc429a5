"""Meta's ``consolidated.pth`` layout <-> mmtrain: the names Meta's reference model uses, the cross-attention layer
numbering, the patch embedding as Meta computes it, round trips, and loading through ``pretrained``."""

import pytest
import torch
import torch.nn.functional as F

from mmtrain.errors import ConfigError
from mmtrain.models.llama3_2_vision import llama3_2_vision_11b, llama3_2_vision_tiny
from mmtrain.models.llama3_2_vision._convert_meta_weights import (
    load_meta_checkpoint,
    meta_to_mmtrain,
    mmtrain_to_meta,
)
from mmtrain.models.llama3_2_vision._pretrained import load_pretrained


def _random_tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    model = llama3_2_vision_tiny(max_num_tiles=2)  # 4 text layers, cross-attention wrapped into layers 1 and 3
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def test_meta_names_and_cross_attention_numbering() -> None:
    ours = _random_tiny().state_dict()
    meta = mmtrain_to_meta(ours)
    pairs = {
        "text_model.layers.1.attention.wq.weight": "decoder.layers.1.attn.q_proj.weight",
        "text_model.layers.3.feed_forward.w2.weight": "decoder.layers.3.mlp.w2.weight",
        "text_model.layers.0.attention_norm.weight": "decoder.layers.0.sa_norm.scale",
        "text_model.cross_attention_layers.0.gate_attn": "decoder.layers.1.fusion_layer.ca_scale.scale",
        "text_model.cross_attention_layers.0.attention_norm.weight": "decoder.layers.1.fusion_layer.ca_norm.scale",
        "text_model.cross_attention_layers.1.attention.k_norm.weight": "decoder.layers.3.fusion_layer.attn.k_norm.scale",
        "text_model.cross_attention_layers.1.gate_ffwd": "decoder.layers.3.fusion_layer.mlp_scale.scale",
        "text_model.learnable_embedding.weight": "decoder.tok_embeddings.fusion_embedding.weight",
        "vision_model.vision_encoder.gated_positional_embedding":
            "encoder.clip.token_pos_embedding.global_token_positional_embedding",
        "vision_model.vision_encoder.transformer.resblocks.1.mlp.c_fc.bias": "encoder.clip.layers.1.mlp.w1.bias",
        "vision_model.vision_encoder.global_transformer.resblocks.0.gate_ffn":
            "encoder.projection.layers.0.mlp_scale.scale",
        "vision_model.vision_projection.weight": "encoder.projection.output.weight",
    }
    for meta_key, our_key in pairs.items():
        assert torch.equal(meta[meta_key], ours[our_key]), meta_key
    assert meta["vision_model.vision_encoder.conv1._linear.weight"].shape == (64, 3 * 8 * 8)
    assert len(meta) == len(ours)
    back = meta_to_mmtrain({**meta, "text_model.rope.freqs": torch.ones(4)})  # Meta's RoPE table is not a weight
    assert sorted(back) == sorted(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match="no counterpart for 'text_model.layers.0.attention.wqkv.weight'"):
        meta_to_mmtrain({**meta, "text_model.layers.0.attention.wqkv.weight": torch.zeros(1)})


def test_the_patch_embedding_computes_what_metas_unfolded_linear_layer_did() -> None:
    """Meta embeds patches with a linear layer over ``unfold``ed pixels; the converted weight as a strided conv
    gives the same tokens (float64)."""
    torch.manual_seed(0)
    width, patch = 6, 4
    linear = torch.randn(width, 3 * patch * patch, dtype=torch.float64)
    image = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    meta_tokens = F.unfold(image, kernel_size=patch, stride=patch).transpose(1, 2) @ linear.T
    state = {"vision_model.vision_encoder.conv1._linear.weight": linear,
             "text_model.layers.0.attention_norm.weight": torch.ones(2),
             "text_model.cross_attention_layers.0.gate_attn": torch.zeros(1)}
    conv = meta_to_mmtrain(state)["encoder.clip.conv.weight"]
    assert conv.shape == (width, 3, patch, patch)
    ours = F.conv2d(image, conv, stride=patch).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, meta_tokens, rtol=1e-12, atol=1e-12)


def test_the_11b_layout_converts_every_key_both_ways() -> None:
    with torch.device("meta"):
        ours = llama3_2_vision_11b().state_dict()
    meta = mmtrain_to_meta(ours)
    cross = sorted({int(k.split(".")[2]) for k in meta if k.startswith("text_model.cross_attention_layers.")})
    assert cross == list(range(8))
    assert max(int(k.split(".")[2]) for k in meta if k.startswith("text_model.layers.")) == 31
    assert meta["text_model.tok_embeddings.weight"].shape == (128256, 4096)
    assert meta["vision_model.vision_encoder.gated_positional_embedding"].shape == (4, 4, 1601, 1280)
    assert meta["vision_model.vision_encoder.conv1._linear.weight"].shape == (1280, 3 * 14 * 14)
    back = meta_to_mmtrain(meta)
    assert sorted(back) == sorted(ours) and all(back[k].shape == ours[k].shape for k in ours)
    fused = sorted({int(k.split(".")[2]) for k in back if ".fusion_layer." in k})
    assert fused == [3, 7, 11, 15, 19, 23, 27, 31]  # Meta's fusion schedule: before every 4th text layer


def test_pretrained_reads_a_meta_folder_and_refuses_shards_and_code(tmp_path, capfd) -> None:
    source = _random_tiny()
    folder = tmp_path / "original"
    folder.mkdir()
    torch.save({**mmtrain_to_meta(source.state_dict()), "text_model.rope.freqs": torch.ones(4)},
               folder / "consolidated.pth")
    target = llama3_2_vision_tiny(max_num_tiles=2)
    assert "Meta checkpoint" in load_pretrained(target, folder)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    assert sorted(load_meta_checkpoint(folder / "consolidated.pth")) == sorted(source.state_dict())

    shards = tmp_path / "sharded"
    shards.mkdir()
    for i in range(2):
        torch.save({}, shards / f"consolidated.0{i}.pth")
    with pytest.raises(ConfigError, match="2 model-parallel shards"):
        load_pretrained(target, shards)

    class RunsCode:
        def __reduce__(self):
            return (print, ("unpickled",))

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    torch.save({"text_model.norm.weight": RunsCode()}, hostile / "consolidated.pth")
    with pytest.raises(ConfigError, match="not a checkpoint of tensors only"):
        load_pretrained(target, hostile)
    assert "unpickled" not in capfd.readouterr().out  # the object's code never ran
