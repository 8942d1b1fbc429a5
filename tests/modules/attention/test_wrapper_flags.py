"""The multi-head wrapper honours the xFormers capability flags of a user's mechanism (as MultiHeadDispatch does)."""

from __future__ import annotations

import pytest
import torch

from mmtrain.modules.attention import Attention, MultiHeadAttention


class FoldedBmmAttention(Attention):
    """Written for xFormers' layout: (batch * heads, S, D) through bmm, which takes 3-D tensors only."""

    supports_key_padding_mask = True

    def __init__(self, dropout=0.0, *args, **kwargs):
        super().__init__(dropout)
        self.seen_shapes = []

    def forward(self, q, k, v, att_mask=None, key_padding_mask=None):
        self.seen_shapes.append((tuple(q.shape), None if att_mask is None else tuple(att_mask.shape),
                                 None if key_padding_mask is None else tuple(key_padding_mask.shape)))
        scores = torch.bmm(q, k.transpose(1, 2)) / q.shape[-1] ** 0.5
        if att_mask is not None:
            scores = scores.masked_fill(~att_mask, float("-inf"))
        if key_padding_mask is not None:  # (batch, S_k) as given to the wrapper: repeated over heads here
            heads = q.shape[0] // key_padding_mask.shape[0]
            scores = scores.masked_fill(~key_padding_mask.repeat_interleave(heads, 0)[:, None, :], float("-inf"))
        return torch.bmm(scores.softmax(-1), v)


def reference(x, mha, keep, heads, project=True):
    """float64 multi-head attention written out: per batch row and head, softmax over the kept keys."""
    b, s, e = x.shape
    d = e // heads
    projections = (mha.q_proj, mha.k_proj, mha.v_proj)
    q, k, v = (x @ p.weight.T for p in projections) if project else (x, x, x)
    out = torch.zeros(b, s, e, dtype=torch.float64)
    for row in range(b):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[row, :, cols] @ k[row, :, cols].T / d ** 0.5
            scores = scores.masked_fill(~keep[row], float("-inf"))
            out[row, :, cols] = scores.softmax(-1) @ v[row, :, cols]
    return out @ mha.output_proj.weight.T


def test_mechanism_without_head_dimension_gets_heads_folded_and_masks_matched():
    torch.manual_seed(0)
    mha = MultiHeadAttention(embed_dim=8, num_heads=2, attention=FoldedBmmAttention()).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    att = torch.rand(3, 5, 5) > 0.3
    att |= torch.eye(5, dtype=torch.bool)
    padding = torch.ones(3, 5, dtype=torch.bool)
    padding[1, 3:] = False
    out = mha(x, mask=att)
    assert mha.attention.seen_shapes[-1] == ((6, 5, 4), (6, 5, 5), None)
    torch.testing.assert_close(out, reference(x, mha, att, heads=2))
    out = mha(x, key_padding_mask=padding)
    assert mha.attention.seen_shapes[-1] == ((6, 5, 4), None, (3, 5))
    torch.testing.assert_close(out, reference(x, mha, padding[:, None, :].expand(3, 5, 5), heads=2))


class Unprojected(FoldedBmmAttention):
    requires_input_projection = False


def test_requires_input_projection_false_attends_over_the_inputs_themselves():
    torch.manual_seed(0)
    mha = MultiHeadAttention(embed_dim=8, num_heads=2, attention=Unprojected()).double()
    assert not any(name.startswith(("q_proj", "k_proj", "v_proj")) for name, _ in mha.named_parameters())
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    keep = torch.ones(2, 4, 4, dtype=torch.bool)
    torch.testing.assert_close(mha(x), reference(x, mha, keep, heads=2, project=False))
    with pytest.raises(ValueError, match="unprojected"):
        MultiHeadAttention(embed_dim=8, num_heads=2, num_kv_heads=1, attention=Unprojected())


class WholeMultiHead(Attention):
    requires_skip_multi_head = True
    supports_attention_mask = False

    def forward(self, q, k, v, *args, **kwargs):
        return 2.0 * q + v.mean(dim=1, keepdim=True)


class SameLengths(FoldedBmmAttention):
    requires_same_k_q_dimensions = True


def test_skip_multi_head_and_same_length_flags():
    mha = MultiHeadAttention(embed_dim=8, num_heads=2, attention=WholeMultiHead())
    x, y = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    torch.testing.assert_close(mha(x, y), 2.0 * x + y.mean(dim=1, keepdim=True))  # no projections, no head split
    with pytest.raises(ValueError, match="does not take an attention mask"):
        mha(x, mask=torch.ones(4, 4, dtype=torch.bool))
    same = MultiHeadAttention(embed_dim=8, num_heads=2, attention=SameLengths())
    assert same(x).shape == (2, 4, 8)
    with pytest.raises(ValueError, match="4 queries and 6 keys"):
        same(x, y)
