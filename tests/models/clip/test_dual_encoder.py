"""CLIP / SigLIP dual encoders: the dual-encoder interface, shapes, EOT pooling against a float64 text tower
written out plainly, attention config reaching both towers, gradients, and the ViT-B/16 preset shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmtrain.models.clip._dual_builders import clip_tiny, clip_vit_b16, siglip_tiny, siglip_vit_b16
from mmtrain.modules.attention import ScaledDotProduct, register_attention

VOCAB = 50


def _batch(b: int = 3, seq: int = 10, image: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([4, seq, 7][:b])
    attention_mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    input_ids = torch.randint(1, VOCAB, (b, seq), generator=gen) * attention_mask
    return torch.randn(b, 3, image, image, generator=gen), input_ids, attention_mask


def test_interface_shapes_and_unit_norm():
    torch.manual_seed(0)
    model = clip_tiny(vocab_size=VOCAB)
    pixels, ids, mask = _batch()
    image, text = model.encode_image(pixels), model.encode_text(ids, mask)
    assert image.shape == (3, 32) and text.shape == (3, 32)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    pair = model(pixels, ids, mask)
    torch.testing.assert_close(pair[0], image)
    torch.testing.assert_close(pair[1], text)
    assert len(model.layer_modules()) == 4  # 2 vision + 2 text layers


def test_logit_scale_and_bias_initial_values_and_clamp():
    clip, siglip = clip_tiny(vocab_size=VOCAB), siglip_tiny(vocab_size=VOCAB)
    scale = clip.get_logit_scale()
    assert scale.ndim == 0 and scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert clip.logit_scale.requires_grad and clip.get_logit_bias() is None
    assert siglip.get_logit_scale().item() == pytest.approx(10.0, rel=1e-6)
    bias = siglip.get_logit_bias()
    assert bias.ndim == 0 and bias.item() == -10.0 and bias.requires_grad
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1000.0))
    assert clip.get_logit_scale().item() == 100.0
    clip.clamp_logit_scale_()
    assert clip.logit_scale.item() == pytest.approx(math.log(100.0)) and clip.get_logit_scale().item() <= 100.0
    with torch.no_grad():
        clip.logit_scale.fill_(-2.0)
    clip.clamp_logit_scale_()
    assert clip.logit_scale.item() == 0.0  # scale >= 1, open_clip's floor


def test_logit_scale_clamp_is_straight_through():
    """Above the ceiling the value stays 100 but the gradient is that of exp(logit_scale), not 0."""
    model = clip_tiny(vocab_size=VOCAB)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0) + 0.01)
    scale = model.get_logit_scale()
    assert scale.item() == 100.0
    scale.backward()
    assert model.logit_scale.grad.item() == pytest.approx(math.exp(math.log(100.0) + 0.01))


def _train_logit_scale(model, image, text, steps: int) -> float:
    """AdamW on the logit scale alone (no weight decay, as for every scalar), clamping after each step as the
    contrastive recipe does; returns the last step's gradient."""
    from mmtrain.losses import ClipLoss

    optimizer = torch.optim.AdamW([model.logit_scale], lr=0.1, weight_decay=0.0)
    loss_fn = ClipLoss()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(image, text, model.get_logit_scale()).backward()
        optimizer.step()
        model.clamp_logit_scale_()
    return model.logit_scale.grad.item()


def test_logit_scale_comes_back_down_after_hitting_the_ceiling():
    """Aligned pairs push the temperature to the ceiling; unrelated pairs then pull it down again. A clamp inside
    the forward pass would leave it stuck at 100 for good once a step carried the parameter past log(100)."""
    model = clip_tiny(vocab_size=VOCAB)
    gen = torch.Generator().manual_seed(0)
    # 32 pairs in 4 dimensions: close negatives, so matching pairs keep asking for a larger scale
    image = F.normalize(torch.randn(32, 4, generator=gen), dim=-1)
    unrelated = F.normalize(torch.randn(32, 4, generator=gen), dim=-1)
    _train_logit_scale(model, image, image, steps=40)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0)) and model.get_logit_scale().item() == 100.0
    last_grad = _train_logit_scale(model, image, unrelated, steps=40)
    assert last_grad > 0 and model.get_logit_scale().item() < 50.0


def _layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _reference_text_tower(sd: dict[str, torch.Tensor], ids, mask, num_layers: int, num_heads: int) -> torch.Tensor:
    """The CLIP text tower in float64, step by step; pools the last real token of each row."""
    sd = {k: v.double() for k, v in sd.items()}
    b, s = ids.shape
    x = sd["token_embedding.weight"][ids] + sd["position_embedding"][:s]
    width = x.shape[-1]
    head = width // num_heads
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(num_layers):
        p = f"layers.{i}."
        h = _layer_norm(x, sd[p + "sa_norm.weight"], sd[p + "sa_norm.bias"])
        q, k, v = (
            (h @ sd[p + f"attn.{n}_proj.weight"].T + sd[p + f"attn.{n}_proj.bias"]).view(b, s, num_heads, head)
            .transpose(1, 2)
            for n in "qkv"
        )
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head)
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, width)
        x = x + attn @ sd[p + "attn.output_proj.weight"].T + sd[p + "attn.output_proj.bias"]
        h = _layer_norm(x, sd[p + "mlp_norm.weight"], sd[p + "mlp_norm.bias"])
        h = h @ sd[p + "mlp.w1.weight"].T + sd[p + "mlp.w1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ sd[p + "mlp.w2.weight"].T + sd[p + "mlp.w2.bias"]
    x = _layer_norm(x, sd["final_norm.weight"], sd["final_norm.bias"])
    pooled = []
    for row in range(b):
        last_real = max(j for j in range(s) if mask[row, j] == 1)
        pooled.append(x[row, last_real])
    return torch.stack(pooled) @ sd["text_projection.weight"].T


def test_text_tower_matches_float64_reference_with_eot_pooling():
    torch.manual_seed(1)
    model = clip_tiny(vocab_size=VOCAB).double()
    _, ids, mask = _batch()
    expected = _reference_text_tower(model.text_encoder.state_dict(), ids, mask, num_layers=2, num_heads=2)
    torch.testing.assert_close(model.text_features(ids, mask), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.encode_text(ids, mask), F.normalize(expected, dim=-1), rtol=1e-10, atol=1e-10)


def test_padding_after_eot_does_not_change_text_embedding():
    torch.manual_seed(0)
    model = clip_tiny(vocab_size=VOCAB)
    _, ids, mask = _batch()
    other = ids.clone()
    other[mask == 0] = 7  # garbage in the padding
    torch.testing.assert_close(model.encode_text(ids, mask), model.encode_text(other, mask))


def test_encode_text_without_mask_infers_it_from_the_pad_id():
    """open_clip's call, ``encode_text(tokens)``: right padding with 0 ([PAD] of mmtrain's tokenizers) is found
    without the mask, so the end token is pooled, not a pad token."""
    from mmtrain.data.tokenizers import shapes_tokenizer

    torch.manual_seed(0)
    model = clip_tiny(vocab_size=VOCAB)
    _, ids, mask = _batch()
    assert (ids[mask == 0] == 0).all() and (mask == 0).any()
    torch.testing.assert_close(model.encode_text(ids), model.encode_text(ids, mask), rtol=0, atol=0)
    assert model.text_encoder.pool_indices(ids, None).tolist() == [3, 9, 6]
    # the shipped tokenizers pad with the builders' default id
    batch = shapes_tokenizer(max_length=16)(["a small red circle", "a large blue square on the left"])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == model.text_encoder.pad_token_id).all()
    torch.manual_seed(0)
    tiny = clip_tiny(vocab_size=72)
    torch.testing.assert_close(tiny.encode_text(batch["input_ids"]),
                               tiny.encode_text(batch["input_ids"], batch["attention_mask"]), rtol=0, atol=0)
    # pad_token_id=None: no padding id, so without a mask every position is real and the last one is pooled
    torch.manual_seed(0)
    no_pad = clip_tiny(vocab_size=VOCAB, pad_token_id=None)
    assert no_pad.text_encoder.pool_indices(ids, None).tolist() == [9, 9, 9]
    torch.testing.assert_close(no_pad.encode_text(ids), no_pad.encode_text(ids, torch.ones_like(ids)))
    assert clip_vit_b16.__kwdefaults__["pad_token_id"] == 0 == siglip_vit_b16.__kwdefaults__["pad_token_id"]


def test_argmax_pooling_pools_the_largest_token_id():
    from mmtrain.models.clip._text_encoder import CLIPTextEncoder

    torch.manual_seed(0)
    tower = CLIPTextEncoder(vocab_size=VOCAB, max_seq_len=8, embed_dim=16, num_layers=1, num_heads=2,
                            output_dim=8, pool="argmax")
    ids = torch.tensor([[3, 49, 5, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 49]])
    assert tower.pool_indices(ids, None).tolist() == [1, 7]
    with pytest.raises(ValueError, match="pool"):
        CLIPTextEncoder(vocab_size=VOCAB, pool="mean")
    with pytest.raises(ValueError, match="context length 8"):
        tower(torch.zeros(1, 9, dtype=torch.long))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = siglip_tiny(vocab_size=VOCAB)
    pixels, ids, mask = _batch()
    image, text = model(pixels, ids, mask)
    logits = model.get_logit_scale() * image @ text.T + model.get_logit_bias()
    labels = 2 * torch.eye(3) - 1
    (-F.logsigmoid(labels * logits).sum()).backward()
    missing = []
    for name, param in model.named_parameters():
        if name == "text_encoder.token_embedding.weight":
            continue  # only the rows of the tokens present get gradient
        if param.grad is None or param.grad.abs().sum() == 0:
            missing.append(name)
    assert not missing
    used = model.text_encoder.token_embedding.weight.grad.abs().sum(-1) > 0
    assert set(used.nonzero().flatten().tolist()) == set(ids[mask.bool()].tolist())


@register_attention("test_dual_encoder_recording")
class _RecordingAttention(ScaledDotProduct):
    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        return super().forward(*args, **kwargs)


def test_attention_config_reaches_every_layer_of_both_towers():
    torch.manual_seed(0)
    default = clip_tiny(vocab_size=VOCAB)
    torch.manual_seed(0)
    swapped = clip_tiny(vocab_size=VOCAB, attention={"name": "test_dual_encoder_recording"})
    mechanisms = [layer.attn.attention for layer in swapped.layer_modules()]
    assert len(mechanisms) == 4 and all(isinstance(m, _RecordingAttention) for m in mechanisms)
    assert [m.causal for m in mechanisms] == [False, False, True, True]  # vision bidirectional, text causal
    pixels, ids, mask = _batch()
    _RecordingAttention.calls = 0
    out = swapped(pixels, ids, mask)
    assert _RecordingAttention.calls == 4
    ref = default(pixels, ids, mask)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])


def test_bad_inputs_raise():
    model = clip_tiny(vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode_image(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        clip_tiny(vocab_size=VOCAB, image_size=30)


def test_vit_b16_presets_have_open_clip_shapes():
    with torch.device("meta"):
        clip = clip_vit_b16()
        siglip = siglip_vit_b16()
    # open_clip ViT-B-16: 149,620,737 parameters (86.2M image tower + 63.4M text tower + logit_scale).
    assert sum(p.numel() for p in clip.parameters()) == 149_620_737
    assert clip.text_encoder.position_embedding.shape == (77, 512)
    assert clip.text_encoder.token_embedding.weight.shape == (49408, 512)
    assert clip.text_encoder.text_projection.weight.shape == (512, 512)
    assert len(clip.layer_modules()) == 24
    assert clip.layer_modules()[0].attn.num_heads == 12 and clip.layer_modules()[12].attn.num_heads == 8
    assert siglip.embed_dim == 768 and siglip.get_logit_bias() is not None
    assert siglip.text_encoder.position_embedding.shape == (64, 768)


@pytest.mark.parametrize("name", ["clip_tiny", "clip_vit_b16", "siglip_vit_b16"])
def test_model_configs_compose_and_build(tmp_path, name):
    from mmtrain.config import instantiate, load

    primary = tmp_path / "only_model.yaml"
    primary.write_text(f"defaults:\n  - /model: {name}\n  - _self_\n")
    overrides = ["model/attention=local"] if name == "clip_tiny" else []
    cfg = load("contrastive", str(primary), overrides)
    assert cfg.model.attention.name == ("local" if name == "clip_tiny" else "scaled_dot_product")
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.get_logit_scale().shape == ()
    assert (model.get_logit_bias() is not None) == name.startswith("siglip")
    assert all(type(layer.attn.attention).__name__ == ("LocalAttention" if name == "clip_tiny" else "ScaledDotProduct")
               for layer in model.layer_modules())
