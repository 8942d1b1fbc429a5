"""The gaps an audit found between mmtrain.modules.attention and xFormers' attention page (seed 004).

Positional masks never silently dropped (Nystrom takes key_padding_mask 4th), ``ScaledDotProduct.mask`` (built
and assigned), masks cropped to shorter sequences and ``(batch, S, S)`` masks on ``(batch * heads, S, D)`` inputs,
config fields set to None, ``utils.maybe_merge_masks``, Nystrom ignoring a wrongly sized key padding mask with a warning, and AttentionMask
storing 2-D masks as ``(1, S, T)`` with ``seq_len``/``to_seq_len``/``to_bool``. Values against float64 references
written out here.
"""

import inspect
import math
import warnings

import pytest
import torch

from mmtrain.modules.attention import (
    AttentionMask,
    FavorAttention,
    GlobalAttention,
    LinformerAttention,
    LocalAttention,
    MultiHeadAttention,
    NystromAttention,
    OrthoFormerAttention,
    RandomAttention,
    ScaledDotProduct,
    build_attention,
)
from mmtrain.modules.attention.utils import maybe_merge_masks

B, H, S, D = 2, 3, 6, 4


def reference(q, k, v, keep=None, additive=None):
    """softmax(q k^T / sqrt(D) + additive, masked by keep) v in float64; a row with no key left gives zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if additive is not None:
        scores = scores + additive.double()
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


def qkv(*lead, s_q=S, s_k=None, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_k = s_q if s_k is None else s_k
    return (torch.randn(*lead, s_q, d, generator=g, dtype=torch.float64),
            torch.randn(*lead, s_k, d, generator=g, dtype=torch.float64),
            torch.randn(*lead, s_k, d, generator=g, dtype=torch.float64))


def padding(batch=B, seq=S):
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[0, -2:] = False
    keep[1, -1:] = False
    return keep


# -- (1) positional masks ---------------------------------------------------------------------------------------

def test_nystrom_forward_signature_is_the_pages():
    names = list(inspect.signature(NystromAttention.forward).parameters)
    assert names == ["self", "q", "k", "v", "key_padding_mask", "args", "kwargs"]
    assert list(inspect.signature(ScaledDotProduct.forward).parameters)[:5] == ["self", "q", "k", "v", "att_mask"]


def test_nystrom_positional_key_padding_mask_is_applied():
    q, k, v = qkv(B * H)
    keep = padding()
    attention = NystromAttention(dropout=0.0, num_heads=H, num_landmarks=S)  # landmarks >= S: exact attention
    positional = attention(q, k, v, keep)
    torch.testing.assert_close(positional, attention(q, k, v, key_padding_mask=keep))
    keep_rows = keep.repeat_interleave(H, dim=0)[:, None, :]  # (B * H, 1, S)
    expected = reference(q, k, v, keep=keep_rows)
    query_kept = keep.repeat_interleave(H, dim=0)  # padded queries are zeroed by Nystrom: compare the real ones
    torch.testing.assert_close(positional[query_kept], expected[query_kept])
    assert not torch.allclose(positional, attention(q, k, v))


def _mechanisms():
    query_flags = torch.zeros(S, dtype=torch.bool)
    query_flags[0] = True
    return {
        "scaled_dot_product": lambda: ScaledDotProduct(),
        "local": lambda: LocalAttention(window_size=3),
        "random": lambda: RandomAttention(dropout=0.0, r=0.6),
        "global": lambda: GlobalAttention(dropout=0.0, attention_query_mask=query_flags),
        "orthoformer": lambda: OrthoFormerAttention(dropout=0.0, num_landmarks=S),
        "linformer": lambda: LinformerAttention(dropout=0.0, seq_len=S, k=3),
        "favor": lambda: FavorAttention(dim_features=8, dim_head=D),
        "nystrom": lambda: NystromAttention(dropout=0.0, num_heads=H, num_landmarks=2),
    }


@pytest.mark.parametrize("name", list(_mechanisms()))
def test_no_mechanism_silently_drops_a_positional_mask(name):
    torch.manual_seed(0)
    attention = _mechanisms()[name]().double()
    q, k, v = qkv(B * H, seed=1)
    g = torch.Generator().manual_seed(2)
    att_mask = torch.rand(S, S, generator=g) > 0.4
    att_mask |= torch.eye(S, dtype=torch.bool)
    kpm = padding()
    fourth = kpm if name == "nystrom" else att_mask
    fourth_name = "key_padding_mask" if name == "nystrom" else "att_mask"
    unmasked = attention(q, k, v)
    if name in ("linformer", "favor"):
        # They take no attention mask: a 4th positional raises rather than disappearing into *args.
        with pytest.raises(ValueError, match="key_padding_mask="):
            attention(q, k, v, att_mask)
    else:
        out = attention(q, k, v, fourth)
        torch.testing.assert_close(out, attention(q, k, v, **{fourth_name: fourth}))
        assert not torch.allclose(out, unmasked)
    # A tensor one position further, or under a name the mechanism does not know, is an error too.
    with pytest.raises(TypeError, match="positional argument 5"):
        attention(q, k, v, None, kpm)
    with pytest.raises(TypeError, match="attn_mask"):
        attention(q, k, v, attn_mask=att_mask)


def test_nystrom_rejects_an_att_mask_keyword():
    attention = NystromAttention(dropout=0.0, num_heads=H, num_landmarks=2)
    q, k, v = qkv(B * H)
    with pytest.raises(ValueError, match="takes no att_mask"):
        attention(q, k, v, att_mask=torch.ones(S, S, dtype=torch.bool))


# -- (4) ScaledDotProduct.mask ----------------------------------------------------------------------------------

def test_scaled_dot_product_mask_attribute():
    attention = ScaledDotProduct(causal=True, seq_len=5, to_seq_len=7)
    mask = attention.mask
    assert isinstance(mask, AttentionMask) and mask.is_causal and mask.shape == (1, 5, 7)
    assert torch.equal(mask.to_bool()[0], torch.ones(5, 7, dtype=torch.bool).tril())
    assert attention.mask is mask  # built once
    assert ScaledDotProduct(causal=True, seq_len=4).mask.shape == (1, 4, 4)
    assert ScaledDotProduct(causal=True).mask is None
    assert ScaledDotProduct(seq_len=4).mask is None
    assert build_attention({"name": "scaled_dot_product"}, causal=True, seq_len=3).mask.shape == (1, 3, 3)
    # forward still computes causal attention on its own, at any length
    q, k, v = qkv(B, H)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    torch.testing.assert_close(ScaledDotProduct(causal=True, seq_len=4)(q, k, v), reference(q, k, v, keep=causal))


def test_an_assigned_scaled_dot_product_mask_applies_to_every_forward():
    q, k, v = qkv(B * H)
    pattern = torch.rand(S + 2, S + 2, generator=torch.Generator().manual_seed(3)) > 0.4
    pattern |= torch.eye(S + 2, dtype=torch.bool)  # no empty row
    keep = pattern[:S, :S]  # made for S + 2 tokens: cropped to the S given, as xFormers' make_crop
    attention = ScaledDotProduct()
    attention.mask = pattern
    assert isinstance(attention.mask, AttentionMask) and attention.mask.shape == (1, S + 2, S + 2)
    torch.testing.assert_close(attention(q, k, v), reference(q, k, v, keep=keep))
    given = torch.ones(S, S, dtype=torch.bool).triu()
    torch.testing.assert_close(attention(q, k, v, att_mask=given), reference(q, k, v, keep=keep & given))
    additive = torch.randn(S, S, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(attention(q, k, v, att_mask=additive),
                               reference(q, k, v, keep=keep, additive=additive))
    causal = ScaledDotProduct(causal=True, seq_len=S)
    causal.mask = AttentionMask(torch.zeros(S, S).masked_fill(~keep, float("-inf")))
    torch.testing.assert_close(causal(q, k, v), reference(q, k, v, keep=keep & torch.ones(S, S).bool().tril()))
    attention.mask = None
    assert attention.mask is None
    torch.testing.assert_close(attention(q, k, v), reference(q, k, v))


@pytest.mark.parametrize("name", ["scaled_dot_product", "local", "global", "random"])
def test_a_per_batch_mask_on_batch_times_heads_inputs_covers_each_batch_rows_heads(name):
    # xFormers' page: "sequence length x sequence length OR batch x sequence length x sequence length"
    q, k, v = qkv(B * H)
    per_batch = torch.rand(B, S, S, generator=torch.Generator().manual_seed(5)) > 0.5
    per_batch |= torch.eye(S, dtype=torch.bool)
    extra = {"local": {"window_size": 3}, "global": {"attention_query_mask": torch.arange(S) < 1},
             "random": {"r": 0.5, "constant_masking": True}}.get(name, {})
    attention = build_attention({"name": name, **extra})
    pattern = attention.pattern(S, S) if hasattr(attention, "pattern") else torch.ones(S, S, dtype=torch.bool)
    per_row = per_batch.repeat_interleave(H, dim=0)  # row b * H + h belongs to batch row b
    expected = reference(q, k, v, keep=per_row & pattern)
    torch.testing.assert_close(attention(q, k, v, att_mask=per_batch), expected)
    longer = torch.ones(B, S + 3, S + 3, dtype=torch.bool)
    longer[:, :S, :S] = per_batch
    torch.testing.assert_close(attention(q, k, v, att_mask=longer), expected)
    with pytest.raises(ValueError, match=r"batch 4 does not divide the attention batch 6 \(batch \* heads\)"):
        attention(q, k, v, att_mask=torch.ones(4, S, S, dtype=torch.bool))


def test_config_fields_set_to_none_take_the_defaults():
    from dataclasses import dataclass

    @dataclass
    class LocalConfig:  # xFormers' config dataclasses default their optional fields to None
        name: str = "local"
        dropout: float | None = None
        causal: bool | None = None
        window_size: int | None = None

    assert build_attention(LocalConfig()).window_size == LocalAttention().window_size == 5
    favor = build_attention({"name": "favor", "dim_head": 4, "feature_map_type": None, "iter_before_redraw": None})
    assert (favor.feature_map_type, favor.iter_before_redraw) == (
        FavorAttention(dim_head=4).feature_map_type, FavorAttention(dim_head=4).iter_before_redraw)


# -- (8) maybe_merge_masks --------------------------------------------------------------------------------------

def test_maybe_merge_masks_none_and_key_padding_only():
    assert maybe_merge_masks(None, None, B, S, H) is None
    att = torch.ones(S, S, dtype=torch.bool)
    assert maybe_merge_masks(att, None, B, S, H) is att
    kpm = padding()
    merged = maybe_merge_masks(None, kpm, B, S, H, tgt_len=4)
    assert merged.shape == (B * H, 4, S) and merged.dtype == torch.bool
    for row in range(B * H):  # row b * H + h belongs to sample b
        assert torch.equal(merged[row], kpm[row // H].expand(4, S))
    assert maybe_merge_masks(None, kpm, B, S, H).shape == (B * H, S, S)


def test_maybe_merge_masks_bool_and_additive():
    kpm = padding()
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(S, S, generator=g) > 0.3
    merged = maybe_merge_masks(keep, kpm, B, S, H)
    assert merged.shape == (B * H, S, S) and merged.dtype == torch.bool
    expected = torch.stack([keep & kpm[row // H][None, :] for row in range(B * H)])
    assert torch.equal(merged, expected)

    additive = torch.randn(B * H, S, S, generator=g, dtype=torch.float64)
    merged = maybe_merge_masks(additive, kpm, B, S, H)
    assert merged.dtype == torch.float64 and merged.shape == (B * H, S, S)
    for row in range(B * H):
        padded = ~kpm[row // H]
        assert torch.isneginf(merged[row][:, padded]).all()
        torch.testing.assert_close(merged[row][:, ~padded], additive[row][:, ~padded])

    per_sample = torch.rand(B, S, S, generator=g) > 0.3  # (batch, S, S): repeated over heads
    merged = maybe_merge_masks(per_sample, kpm, B, S, H)
    for row in range(B * H):
        assert torch.equal(merged[row], per_sample[row // H] & kpm[row // H][None, :])

    wrapped = maybe_merge_masks(AttentionMask.make_causal(S), kpm, B, S, H)
    assert isinstance(wrapped, AttentionMask) and wrapped.is_causal and wrapped.shape == (B * H, S, S)
    assert torch.equal(wrapped.to_bool(), torch.ones(S, S, dtype=torch.bool).tril() & kpm.repeat_interleave(H, 0)[:, None])


def test_maybe_merge_masks_feeds_scaled_dot_product():
    q, k, v = qkv(B * H)
    kpm = padding()
    g = torch.Generator().manual_seed(4)
    additive = torch.randn(S, S, generator=g, dtype=torch.float64)
    merged = maybe_merge_masks(additive, kpm, B, S, H)
    out = ScaledDotProduct()(q, k, v, merged)
    keep_rows = kpm.repeat_interleave(H, dim=0)[:, None, :]
    torch.testing.assert_close(out, reference(q, k, v, keep=keep_rows, additive=additive))


def test_maybe_merge_masks_errors():
    with pytest.raises(ValueError, match=r"\(batch_size, src_len\) = \(2, 6\), got \(2, 5\)"):
        maybe_merge_masks(None, torch.ones(B, S - 1, dtype=torch.bool), B, S, H)
    with pytest.raises(ValueError, match="does not broadcast"):
        maybe_merge_masks(torch.ones(S, S + 1, dtype=torch.bool), padding(), B, S, H)


# -- (9) Nystrom ignores a wrongly sized key padding mask, with a warning ---------------------------------------

@pytest.mark.parametrize("bad_shape", [(4, S), (B, S + 1), (B * H, 2, S)])
def test_nystrom_wrong_key_padding_mask_is_ignored_with_a_warning(bad_shape):
    q, k, v = qkv(B * H)
    attention = NystromAttention(dropout=0.0, num_heads=H, num_landmarks=2).double()
    bad = torch.ones(bad_shape, dtype=torch.bool)
    bad[..., 0] = False
    with pytest.warns(UserWarning, match="ignores this key_padding_mask") as record:
        out = attention(q, k, v, bad)
    message = str(record[0].message)
    assert str(tuple(bad_shape)) in message and "expected" in message and f"({B * H}, 1, {S})" in message
    assert record[0].filename == __file__  # points at the caller
    torch.testing.assert_close(out, attention(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, padding())  # a fitting mask: no warning
    with pytest.raises(ValueError, match="expected"):  # the dense path keeps raising
        ScaledDotProduct()(q, k, v, key_padding_mask=bad)


# -- (10) AttentionMask is 3-D ----------------------------------------------------------------------------------

def test_attention_mask_stores_2d_as_3d():
    causal = AttentionMask.make_causal(4, 6)
    assert causal.shape == (1, 4, 6) and causal.ndim == 3
    assert causal.seq_len == 4 and causal.to_seq_len == 6
    assert torch.equal(causal.to_bool(), torch.ones(1, 4, 6, dtype=torch.bool).tril())
    batch = AttentionMask.from_bool(torch.rand(B, 4, 6) > 0.5)
    assert batch.shape == (B, 4, 6) and batch.seq_len == 4 and batch.to_seq_len == 6
    crop = causal.make_crop(3)
    assert crop.shape == (1, 3, 3) and crop.seq_len == 3 and crop.to_seq_len == 3 and crop.is_causal
    assert crop.values.data_ptr() == causal.values.data_ptr()
    total = causal + batch
    assert total.shape == (B, 4, 6)
    assert torch.equal(total.to_bool(), causal.to_bool() & batch.to_bool())
    moved = causal.to(torch.float64)
    assert moved.shape == (1, 4, 6) and moved.dtype == torch.float64 and moved.seq_len == 4


def _keep_mask(seed=5):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(S, S, generator=g) > 0.4
    return keep | torch.eye(S, dtype=torch.bool)


@pytest.mark.parametrize("lead", [(B * H,), (B, H)])
def test_attention_mask_consumers(lead):
    q, k, v = qkv(*lead, seed=6)
    keep = _keep_mask()
    mask = AttentionMask.from_bool(keep).to(torch.float64)
    torch.testing.assert_close(ScaledDotProduct()(q, k, v, mask), reference(q, k, v, keep=keep))
    band = (torch.arange(S)[:, None] - torch.arange(S)[None, :]).abs() <= 1
    torch.testing.assert_close(LocalAttention(window_size=3)(q, k, v, mask), reference(q, k, v, keep=keep & band))
    query_flags = torch.zeros(S, dtype=torch.bool)
    query_flags[0] = True
    is_global = query_flags[:, None] | query_flags[None, :]
    torch.testing.assert_close(GlobalAttention(dropout=0.0, attention_query_mask=query_flags)(q, k, v, mask),
                               reference(q, k, v, keep=keep & is_global))
    random_attention = RandomAttention(dropout=0.0, r=0.5)  # constant_masking: one pattern for every call
    torch.testing.assert_close(random_attention(q, k, v, mask),
                               reference(q, k, v, keep=keep & random_attention.pattern(S, S)))
    torch.testing.assert_close(OrthoFormerAttention(dropout=0.0, num_landmarks=S)(q, k, v, mask),
                               reference(q, k, v, keep=keep))
    causal = AttentionMask.make_causal(S, dtype=torch.float64)
    torch.testing.assert_close(ScaledDotProduct()(q, k, v, causal),
                               reference(q, k, v, keep=torch.ones(S, S, dtype=torch.bool).tril()))


def test_scaled_dot_product_2d_key_padding_with_4d_inputs():
    q, k, v = qkv(B, H)
    kpm = padding()
    out = ScaledDotProduct()(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out, reference(q, k, v, keep=kpm[:, None, None, :]))


def test_multi_head_wrapper_with_attention_masks():
    torch.manual_seed(0)
    mha = MultiHeadAttention(embed_dim=H * D, num_heads=H, head_dim=D).double()
    x = torch.randn(B, S, H * D, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    keep_b = torch.rand(B, S, S, generator=g) > 0.4
    keep_b |= torch.eye(S, dtype=torch.bool)
    keep_2d = _keep_mask()

    def expected(keep):  # (b, S, S) keep mask, projections written out in float64
        q = (x @ mha.q_proj.weight.T).view(B, S, H, D).transpose(1, 2)
        k = (x @ mha.k_proj.weight.T).view(B, S, H, D).transpose(1, 2)
        v = (x @ mha.v_proj.weight.T).view(B, S, H, D).transpose(1, 2)
        out = reference(q, k, v, keep=keep[:, None])
        return out.transpose(1, 2).reshape(B, S, H * D) @ mha.output_proj.weight.T

    torch.testing.assert_close(mha(x, mask=AttentionMask.from_bool(keep_b).to(torch.float64)), expected(keep_b))
    torch.testing.assert_close(mha(x, mask=AttentionMask.from_bool(keep_2d).to(torch.float64)),
                               expected(keep_2d.expand(B, S, S)))
