"""Transformer layers against float64 references written out plainly."""

import math

import pytest
import torch
from torch import nn

from mmtrain.modules import (
    FeedForward,
    Fp32LayerNorm,
    RMSNorm,
    TanhGate,
    TransformerCrossAttentionLayer,
    TransformerSelfAttentionLayer,
)
from mmtrain.modules.attention import MultiHeadAttention

D, H = 8, 2


def _mha(**kw):
    return MultiHeadAttention(embed_dim=D, num_heads=H, **kw).double()


def _ref_attention(mha, x, y, mask=None):
    b, s, _ = x.shape
    hd = D // H
    q = (x @ mha.q_proj.weight.T).view(b, s, H, hd).transpose(1, 2)
    k = (y @ mha.k_proj.weight.T).view(b, y.shape[1], H, hd).transpose(1, 2)
    v = (y @ mha.v_proj.weight.T).view(b, y.shape[1], H, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, D)
    return out @ mha.output_proj.weight.T


def _ref_ffn(ffn, x):
    return (torch.nn.functional.silu(x @ ffn.w1.weight.T) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T


def _ffn():
    return FeedForward(gate_proj=nn.Linear(D, 16, bias=False), down_proj=nn.Linear(16, D, bias=False),
                       up_proj=nn.Linear(D, 16, bias=False)).double()


def _ref_rms(norm, x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps) * norm.scale


def test_rmsnorm_fp32_layernorm_tanh_gate():
    torch.manual_seed(0)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    norm = RMSNorm(D).double()
    with torch.no_grad():
        norm.scale.copy_(torch.rand(D))
    torch.testing.assert_close(norm(x), _ref_rms(norm, x))
    ln = Fp32LayerNorm(D)
    xb = x.to(torch.bfloat16)
    out = ln(xb)
    assert out.dtype == torch.bfloat16
    mu = xb.double().mean(-1, keepdim=True)
    var = ((xb.double() - mu) ** 2).mean(-1, keepdim=True)
    torch.testing.assert_close(out.double(), (xb.double() - mu) / torch.sqrt(var + ln.eps), atol=2e-2, rtol=2e-2)
    gate = TanhGate()
    assert torch.equal(gate(x), torch.zeros_like(x))
    with torch.no_grad():
        gate.scale.fill_(0.5)
    torch.testing.assert_close(gate.double()(x), x * math.tanh(0.5))


def test_feed_forward_keys_and_values():
    ffn = _ffn()
    assert sorted(ffn.state_dict()) == ["w1.weight", "w2.weight", "w3.weight"]
    x = torch.randn(2, 3, D, dtype=torch.float64)
    torch.testing.assert_close(ffn(x), _ref_ffn(ffn, x))
    plain = FeedForward(gate_proj=nn.Linear(D, 4), down_proj=nn.Linear(4, D), activation=nn.GELU()).double()
    torch.testing.assert_close(plain(x), plain.w2(torch.nn.functional.gelu(plain.w1(x))))


def test_self_attention_layer_matches_reference_and_keys():
    torch.manual_seed(1)
    layer = TransformerSelfAttentionLayer(_mha(), _ffn(), sa_norm=RMSNorm(D).double(), mlp_norm=RMSNorm(D).double())
    assert sorted(layer.state_dict()) == sorted([
        "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.output_proj.weight",
        "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight", "sa_norm.scale", "mlp_norm.scale",
    ])
    x = torch.randn(2, 5, D, dtype=torch.float64)
    mask = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5)
    hn = _ref_rms(layer.sa_norm, x)
    h = x + _ref_attention(layer.attn, hn, hn, mask)
    expected = h + _ref_ffn(layer.mlp, _ref_rms(layer.mlp_norm, h))
    torch.testing.assert_close(layer(x, mask=mask), expected)


def test_cross_attention_layer_skips_rows_without_image():
    torch.manual_seed(2)
    layer = TransformerCrossAttentionLayer(_mha(), _ffn(), ca_norm=RMSNorm(D).double(),
                                           mlp_norm=RMSNorm(D).double(), ca_scale=TanhGate().double(),
                                           mlp_scale=TanhGate().double())
    with torch.no_grad():
        layer.ca_scale.scale.fill_(0.7)
        layer.mlp_scale.scale.fill_(-0.3)
    assert "ca_scale.scale" in layer.state_dict() and "mlp_scale.scale" in layer.state_dict()
    x = torch.randn(1, 3, D, dtype=torch.float64, requires_grad=True)
    enc = torch.randn(1, 4, D, dtype=torch.float64)
    mask = torch.tensor([[[False] * 4, [True, False, True, False], [True] * 4]])
    out = layer(x, encoder_input=enc, encoder_mask=mask)
    # The first token sees no image: it passes through unchanged.
    torch.testing.assert_close(out[0, 0], x[0, 0])
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    xd = x.detach()
    rows = []
    for i in (1, 2):
        xi = xd[:, i : i + 1]
        a = _ref_attention(layer.attn, _ref_rms(layer.ca_norm, xi), enc, mask[:, i : i + 1])
        h = xi + math.tanh(0.7) * a
        rows.append(h + math.tanh(-0.3) * _ref_ffn(layer.mlp, _ref_rms(layer.mlp_norm, h)))
    torch.testing.assert_close(out[:, 1:].detach(), torch.cat(rows, dim=1))
    # No encoder input and no cache: identity.
    assert layer(xd) is xd


def test_cross_attention_rejects_positional_embeddings():
    with pytest.raises(AssertionError, match="positional embeddings"):
        TransformerCrossAttentionLayer(_mha(pos_embeddings=nn.Identity()), _ffn())
