"""AttentionMask and dense ScaledDotProduct against a float64 softmax written out here."""

import math

import pytest
import torch

from mmtrain.modules.attention import AttentionMask, ScaledDotProduct

torch.set_default_dtype(torch.float32)


def reference(q, k, v, keep=None, additive=None):
    """softmax(q k^T / sqrt(D) + additive, masked by keep) v in float64; rows with no key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if additive is not None:
        scores = scores + additive.double()
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def qkv(*lead, s_q=7, s_k=None, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_k = s_q if s_k is None else s_k
    return (torch.randn(*lead, s_q, d, generator=g, dtype=torch.float64),
            torch.randn(*lead, s_k, d, generator=g, dtype=torch.float64),
            torch.randn(*lead, s_k, d, generator=g, dtype=torch.float64))


def test_from_bool_true_keeps_and_from_multiplicative():
    keep = torch.tensor([[True, False], [False, True]])
    mask = AttentionMask.from_bool(keep)
    # A 2-D mask is stored as (1, S, T), as xFormers does.
    assert mask.values[0, 0, 0] == 0 and mask.values[0, 0, 1] == float("-inf")
    assert mask.shape == (1, 2, 2) and mask.ndim == 3 and mask.dtype == torch.float32
    assert mask.device == torch.device("cpu") and not mask.is_sparse and not mask.is_causal
    multiplicative = AttentionMask.from_multiplicative(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(multiplicative.values, mask.values)
    with pytest.raises(ValueError, match="bool"):
        AttentionMask.from_bool(torch.ones(2, 2))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        AttentionMask(torch.zeros(4))


def test_make_causal_crop_add_and_to():
    causal = AttentionMask.make_causal(5, 6, dtype=torch.float64)
    assert causal.is_causal and causal.dtype == torch.float64
    expected = torch.tensor([[j <= i for j in range(6)] for i in range(5)])
    assert torch.equal(torch.isfinite(causal.values), expected[None])
    crop = causal.make_crop(3, 4)
    assert crop.shape == (1, 3, 4) and crop.is_causal
    assert crop.values.data_ptr() == causal.values.data_ptr()  # a view, not a copy
    padding = AttentionMask.from_bool(torch.tensor([True, True, True, False])[None, :].expand(3, 4))
    both = crop + padding
    assert both.is_causal
    assert torch.equal(torch.isfinite(both.values), (expected[:3, :4] & torch.tensor([True, True, True, False]))[None])
    assert (crop.to(torch.float16)).dtype == torch.float16
    with pytest.raises(ValueError):
        crop.to(torch.bool)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:  # without dtype, torch's default dtype (as xFormers), not always float32
        assert AttentionMask.make_causal(3).dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)
    assert AttentionMask.make_causal(3).dtype == previous


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_dense_bool_and_additive_masks_2d_3d(lead):
    q, k, v = qkv(*lead, s_q=5, s_k=7)
    g = torch.Generator().manual_seed(1)
    keep2 = torch.rand(5, 7, generator=g) > 0.4
    keep2[:, 0] = True
    attention = ScaledDotProduct()
    torch.testing.assert_close(attention(q, k, v, att_mask=keep2), reference(q, k, v, keep=keep2))
    additive = torch.randn(5, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(attention(q, k, v, att_mask=additive), reference(q, k, v, additive=additive))
    keep3 = torch.rand(*lead, 5, 7, generator=g) > 0.4
    keep3[..., 0] = True
    torch.testing.assert_close(attention(q, k, v, att_mask=keep3), reference(q, k, v, keep=keep3))
    mask = AttentionMask.from_bool(keep2).to(torch.float64)
    torch.testing.assert_close(attention(q, k, v, att_mask=mask), reference(q, k, v, keep=keep2))


def test_dense_key_padding_combined_with_attention_mask_3d_inputs():
    batch, heads = 2, 3
    q, k, v = qkv(batch * heads, s_q=6)
    key_padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # (batch, S_k)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    out = ScaledDotProduct()(q, k, v, att_mask=keep, key_padding_mask=key_padding)
    expanded = key_padding.repeat_interleave(heads, dim=0)[:, None, :]  # row b*heads+h uses batch b
    torch.testing.assert_close(out, reference(q, k, v, keep=keep & expanded))
    additive_padding = torch.zeros(2, 6, dtype=torch.float64).masked_fill(~key_padding, float("-inf"))
    out_additive = ScaledDotProduct()(q, k, v, key_padding_mask=additive_padding)
    torch.testing.assert_close(out_additive, reference(q, k, v, keep=expanded.expand(6, 6, 6)))


def test_dense_causal_and_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, s_q=5))
    out = ScaledDotProduct(causal=True)(q, k, v)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = reference(q2, k2, v2, keep=torch.ones(5, 5, dtype=torch.bool).tril())
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for got, want in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(got.grad, want.grad)


def test_dense_causal_decoding_is_bottom_right_aligned():
    q, k, v = qkv(3, s_q=2, s_k=5)
    keep = torch.tensor([[j <= i + 3 for j in range(5)] for i in range(2)])
    torch.testing.assert_close(ScaledDotProduct(causal=True)(q, k, v), reference(q, k, v, keep=keep))
