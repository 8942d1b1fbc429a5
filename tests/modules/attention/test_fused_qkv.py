"""Fused QKV projections in MultiHeadAttention: one matmul on the concatenated weights gives the same outputs and
gradients as three, leaves the parameters and state-dict keys alone, and steps aside where it does not apply."""

import math

import pytest
import torch
from torch import nn

from mmtrain.modules.attention import MultiHeadAttention, set_fused_qkv
from mmtrain.modules.lora import LoRALinear
from mmtrain.modules.rope import RotaryPositionalEmbeddings

B, S, D, H = 2, 5, 16, 4


def plain_attention(x, q_w, k_w, v_w, o_w, q_b=None, k_b=None, v_b=None, keep=None):
    """float64 multi-head self-attention written out: per-head softmax(q k^T / sqrt(d)) v, then the output proj."""
    d = q_w.shape[0] // H

    def heads(t):
        return t.view(B, -1, H, d).transpose(1, 2)

    q = heads(x @ q_w.T + (0 if q_b is None else q_b))
    k = heads(x @ k_w.T + (0 if k_b is None else k_b))
    v = heads(x @ v_w.T + (0 if v_b is None else v_b))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(B, -1, H * d) @ o_w.T


def calls_of(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, S, D, generator=g, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_projection_matches_float64_attention_with_gradients(bias, causal):
    torch.manual_seed(0)
    mha = MultiHeadAttention(embed_dim=D, num_heads=H, bias=bias, is_causal=causal, fused_qkv=True).double()
    q_calls = calls_of(mha.q_proj)
    x = inputs()
    out = mha(x)
    assert q_calls == []  # the fused matmul ran, not q_proj's own call
    params = [mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight, mha.output_proj.weight]
    if bias:
        params += [mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]
    leaves = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x.detach().clone().requires_grad_()
    keep = torch.ones(S, S, dtype=torch.bool).tril() if causal else None
    if bias:
        expected = plain_attention(x_ref, *leaves[:4], *leaves[4:], keep=keep)
    else:
        expected = plain_attention(x_ref, *leaves, keep=keep)
    if bias:
        expected = expected + mha.output_proj.bias.detach()
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, [x, *params], grad_out)
    want = torch.autograd.grad(expected, [x_ref, *leaves], grad_out)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("case", ["gqa", "rope", "mask", "key_padding"])
def test_fused_equals_separate_projections_where_attention_takes_q_k_v_apart(case):
    kwargs = {"gqa": {"num_kv_heads": 2}, "rope": {"pos_embeddings": RotaryPositionalEmbeddings(D // H, 16)}}
    torch.manual_seed(0)
    separate = MultiHeadAttention(embed_dim=D, num_heads=H, bias=True, **kwargs.get(case, {})).double()
    fused = MultiHeadAttention(embed_dim=D, num_heads=H, bias=True, fused_qkv=True, **kwargs.get(case, {})).double()
    fused.load_state_dict(separate.state_dict())
    call_kwargs = {}
    if case == "mask":
        call_kwargs["mask"] = torch.rand(B, S, S, generator=torch.Generator().manual_seed(2)) > 0.3
        call_kwargs["mask"][:, :, 0] = True
    if case == "key_padding":
        call_kwargs["key_padding_mask"] = torch.tensor([[True] * S, [True] * 3 + [False] * 2])
    x = inputs()
    x2 = x.detach().clone().requires_grad_()
    q_calls = calls_of(fused.q_proj)
    out_fused, out_separate = fused(x, **call_kwargs), separate(x2, **call_kwargs)
    assert q_calls == []
    torch.testing.assert_close(out_fused, out_separate)
    out_fused.square().sum().backward()
    out_separate.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (name, a), (_, b) in zip(fused.named_parameters(), separate.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_cross_attention_lora_and_kv_cache_keep_separate_projections():
    torch.manual_seed(0)
    mha = MultiHeadAttention(embed_dim=D, num_heads=H, fused_qkv=True).double()
    q_calls = calls_of(mha.q_proj)
    y = torch.randn(B, 7, D, dtype=torch.float64)
    mha(inputs(), y)  # keys and values from y: nothing to fuse with q
    assert len(q_calls) == 1
    lora = MultiHeadAttention(embed_dim=D, num_heads=H, fused_qkv=True,
                              q_proj=LoRALinear(D, D, rank=2, alpha=4.0)).double()
    lora_calls = calls_of(lora.q_proj)
    lora(inputs())
    assert len(lora_calls) == 1
    cached = MultiHeadAttention(embed_dim=D, num_heads=H, fused_qkv=True, is_causal=True).double()
    cached.setup_cache(B, torch.float64, max_seq_len=16)
    cached_calls = calls_of(cached.q_proj)
    cached(inputs())
    assert len(cached_calls) == 1 and cached.kv_cache.size == S


def test_fusing_keeps_the_state_dict_and_set_fused_qkv_switches_every_attention():
    torch.manual_seed(0)
    model = nn.Sequential(MultiHeadAttention(embed_dim=D, num_heads=H), MultiHeadAttention(embed_dim=D, num_heads=H))
    keys = list(model.state_dict())
    assert set_fused_qkv(model) == 2
    assert all(m.fused_qkv for m in model)
    assert list(model.state_dict()) == keys
    assert set_fused_qkv(model, False) == 2 and not any(m.fused_qkv for m in model)


def test_the_recipes_fused_qkv_key_switches_where_fa4_reads_the_packed_projection():
    from mmtrain.errors import ConfigError
    from mmtrain.modules.attention.multi_head import apply_fused_qkv_setting

    def model():
        torch.manual_seed(0)
        return nn.ModuleDict({
            "vision": MultiHeadAttention(embed_dim=D, num_heads=H),
            "gqa": MultiHeadAttention(embed_dim=D, num_heads=H, num_kv_heads=2),
            "rope": MultiHeadAttention(embed_dim=D, num_heads=H, pos_embeddings=RotaryPositionalEmbeddings(D // H)),
        })

    def switched(m):
        return sorted(name for name, mha in m.items() if mha.fused_qkv)

    m = model()
    assert apply_fused_qkv_setting(m, "auto", "fa4") == 1 and switched(m) == ["vision"]
    m = model()
    assert apply_fused_qkv_setting(m, "auto", "auto") == 0 and switched(m) == []
    assert apply_fused_qkv_setting(m, True, "cudnn") == 3 and switched(m) == ["gqa", "rope", "vision"]
    assert apply_fused_qkv_setting(m, False, "fa4") == 0 and switched(m) == []
    with pytest.raises(ConfigError, match="fused_qkv: expected auto, true or false, got 'yes'"):
        apply_fused_qkv_setting(m, "yes", "fa4")
