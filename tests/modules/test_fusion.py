"""FusionLayer / FusionEmbedding / DeepFusionModel: identity at init, key names, trainable parts."""

import pytest
import torch
from torch import nn

from mmtrain.models.llama3_2_vision import llama3_2_vision_tiny
from mmtrain.models.llama3_2_vision._decoder import llama3_2_vision_decoder
from mmtrain.modules.fusion import FusionEmbedding, FusionLayer, get_fusion_params

CFG = dict(vocab_size=40, num_layers=2, fusion_interval=1, num_special_tokens=2, num_heads=2, num_kv_heads=1,
           embed_dim=16, max_seq_len=32, encoder_max_seq_len=8, intermediate_dim=24)


def test_closed_tanh_gates_make_fusion_layers_identity_on_text_path() -> None:
    torch.manual_seed(0)
    decoder = llama3_2_vision_decoder(**CFG)
    layer = decoder.layers[0]
    assert isinstance(layer, FusionLayer)
    x = torch.randn(2, 5, 16)
    enc = torch.randn(2, 4, 16)
    mask = torch.ones(2, 5, 4, dtype=torch.bool)
    torch.testing.assert_close(layer.fusion_layer(x, encoder_input=enc, encoder_mask=mask), x, rtol=0, atol=0)
    # The whole decoder at init gives the same logits with and without images.
    tokens = torch.randint(0, 40, (2, 5))
    torch.testing.assert_close(decoder(tokens, encoder_input=enc, encoder_mask=mask), decoder(tokens))
    with torch.no_grad():
        layer.fusion_layer.ca_scale.scale.fill_(1.0)
    assert not torch.allclose(layer.fusion_layer(x, encoder_input=enc, encoder_mask=mask), x)


def test_fusion_embedding_routes_new_tokens_and_keeps_original_key() -> None:
    emb = FusionEmbedding(vocab_size=5, fusion_vocab_size=2, embed_dim=3)
    ids = torch.tensor([[0, 4, 5, 6]])
    out = emb(ids)
    torch.testing.assert_close(out[0, :2], emb.embedding.weight[[0, 4]])
    torch.testing.assert_close(out[0, 2:], emb.fusion_embedding.weight[[0, 1]])
    assert sorted(emb.state_dict()) == ["fusion_embedding.weight", "weight"]
    other = FusionEmbedding(5, 2, 3)
    other.load_state_dict(emb.state_dict())
    torch.testing.assert_close(other(ids), out)


def test_fusion_layer_state_dict_hides_wrapper_and_round_trips() -> None:
    layer = FusionLayer(nn.Linear(2, 2), nn.Linear(2, 2))
    assert sorted(layer.state_dict()) == ["bias", "fusion_layer.bias", "fusion_layer.weight", "weight"]
    other = FusionLayer(nn.Linear(2, 2), nn.Linear(2, 2))
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other.layer.weight, layer.layer.weight)
    assert layer.fusion_params() == ["fusion_layer.weight", "fusion_layer.bias"]


def test_trainable_parts_follow_flags() -> None:
    model = llama3_2_vision_tiny(decoder_trainable=False, encoder_trainable=False, fusion_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fusion = set(get_fusion_params(model))
    assert trainable == fusion
    assert any(n.startswith("encoder.projection.") for n in trainable)
    assert "decoder.tok_embeddings.fusion_embedding.weight" in trainable
    assert any(".fusion_layer." in n for n in trainable)
    assert not any(n.startswith("encoder.clip.") for n in trainable)
    assert "decoder.tok_embeddings.embedding.weight" not in trainable
    frozen_fusion = llama3_2_vision_tiny(decoder_trainable=True, encoder_trainable=True, fusion_trainable=False)
    assert not any(p.requires_grad for n, p in frozen_fusion.named_parameters() if ".fusion_layer." in n)


def test_trainable_flags_take_torchtunes_full_and_frozen_and_refuse_the_rest() -> None:
    def trainable(**flags):
        return {n.split(".")[0] for n, p in llama3_2_vision_tiny(**flags).named_parameters() if p.requires_grad}

    assert trainable(decoder_trainable="frozen", encoder_trainable="frozen", fusion_trainable="frozen") == set()
    assert trainable(decoder_trainable="full", encoder_trainable=False, fusion_trainable=False) == {"decoder"}
    with pytest.raises(ValueError, match="decoder_trainable=.lora. needs the LoRA builders"):
        llama3_2_vision_tiny(decoder_trainable="lora")
    with pytest.raises(ValueError, match="must be True, False, 'full' or 'frozen'"):
        llama3_2_vision_tiny(encoder_trainable="yes")
