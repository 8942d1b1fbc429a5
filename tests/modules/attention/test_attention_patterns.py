"""Local, random and global attention equal dense float64 attention with their pattern written out here."""

import math

import pytest
import torch

from mmtrain.modules.attention import GlobalAttention, LocalAttention, RandomAttention
from mmtrain.modules.attention import pattern as pattern_module


def reference(q, k, v, keep=None, additive=None):
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if additive is not None:
        scores = scores + additive.double()
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def qkv(*lead, s_q, s_k=None, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_k = s_q if s_k is None else s_k
    tensors = (torch.randn(*lead, s_q, d, generator=g, dtype=torch.float64),
               torch.randn(*lead, s_k, d, generator=g, dtype=torch.float64),
               torch.randn(*lead, s_k, d, generator=g, dtype=torch.float64))
    return tuple(t.requires_grad_() for t in tensors)


def local_pattern(s_q, s_k, window, causal):
    keep = torch.zeros(s_q, s_k, dtype=torch.bool)
    offset = s_k - s_q if causal else 0
    for i in range(s_q):
        for j in range(s_k):
            if causal:
                keep[i, j] = 0 <= (i + offset) - j <= window
            else:
                keep[i, j] = abs(i - j) <= window // 2
    return keep


def global_pattern(s, flags, causal):
    keep = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(s):
            keep[i, j] = bool(flags[i] or flags[j]) and (j <= i or not causal)
    return keep


def assert_matches(attention, q, k, v, keep, **kwargs):
    """Forward and gradients of ``attention`` equal the float64 reference with the explicit ``keep`` pattern."""
    additive = kwargs.pop("reference_additive", None)
    out = attention(q, k, v, **kwargs)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = reference(*leaves, keep=keep, additive=additive)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("window,causal", [(5, False), (3, False), (1, False), (4, True), (5, True)])
def test_local_equals_dense_with_band(window, causal):
    q, k, v = qkv(3, s_q=11)
    assert_matches(LocalAttention(window_size=window, causal=causal), q, k, v, local_pattern(11, 11, window, causal))


def test_local_pattern_method_and_decoding_alignment():
    attention = LocalAttention(window_size=3, causal=True)
    assert torch.equal(attention.pattern(4, 9), local_pattern(4, 9, 3, True))
    q, k, v = qkv(2, 2, s_q=4, s_k=9)
    assert_matches(attention, q, k, v, local_pattern(4, 9, 3, True))


def test_local_with_masks_and_key_padding_4d():
    q, k, v = qkv(2, 3, s_q=9)  # (batch, heads, S, D) as the multi-head wrapper passes
    band = local_pattern(9, 9, 5, False)
    g = torch.Generator().manual_seed(3)
    extra_keep = torch.rand(9, 9, generator=g) > 0.3
    assert_matches(LocalAttention(window_size=5), q, k, v, band & extra_keep, att_mask=extra_keep)
    additive = torch.randn(9, 9, generator=g, dtype=torch.float64)
    assert_matches(LocalAttention(window_size=5), q, k, v, band, att_mask=additive, reference_additive=additive)
    key_padding = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])[:, None, None, :]
    assert_matches(LocalAttention(window_size=5), q, k, v, band & key_padding, key_padding_mask=key_padding)


def test_local_key_padding_2d_with_xformers_3d_inputs():
    batch, heads = 2, 2
    q, k, v = qkv(batch * heads, s_q=8)
    key_padding = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    keep = local_pattern(8, 8, 3, False) & key_padding.repeat_interleave(heads, 0)[:, None, :]
    assert_matches(LocalAttention(window_size=3), q, k, v, keep, key_padding_mask=key_padding)


def test_masked_path_in_chunks_equals_one_pass(monkeypatch):
    """Small chunk budget: many query chunks, each against its band of keys, recomputed in backward."""
    monkeypatch.setattr(pattern_module, "_CHUNK_ELEMENTS", 24)
    q, k, v = qkv(2, s_q=13)
    assert_matches(LocalAttention(window_size=5), q, k, v, local_pattern(13, 13, 5, False))
    assert_matches(LocalAttention(window_size=4, causal=True), q, k, v, local_pattern(13, 13, 4, True))
    flags = [True, False, False, True] + [False] * 9
    assert_matches(GlobalAttention(attention_query_mask=torch.tensor(flags)), q, k, v,
                   global_pattern(13, flags, False))


def test_local_window_errors_name_the_argument():
    with pytest.raises(ValueError, match="window_size=4 is even"):
        LocalAttention(window_size=4)
    with pytest.raises(ValueError, match="window_size"):
        LocalAttention(window_size=0, causal=True)
    LocalAttention(window_size=4, causal=True)  # even is fine when causal


@pytest.mark.parametrize("causal", [False, True])
def test_random_equals_dense_with_its_fixed_pattern(causal):
    torch.manual_seed(0)
    attention = RandomAttention(r=0.3, causal=causal)
    keep = attention.pattern(12, 12)
    assert keep.diagonal().all()  # every query keeps itself
    if causal:
        assert not keep.triu(1).any()
    q, k, v = qkv(2, 2, s_q=12)
    assert_matches(attention, q, k, v, keep)
    assert torch.equal(attention.pattern(12, 12), keep)  # constant masking: same pattern every call


def test_random_density_and_redraw():
    torch.manual_seed(0)
    attention = RandomAttention(r=0.25)
    keep = attention.pattern(256, 256)
    off_diagonal = keep[~torch.eye(256, dtype=torch.bool)].double().mean().item()
    assert abs(off_diagonal - 0.25) < 0.01
    changing = RandomAttention(r=0.25, constant_masking=False)
    assert not torch.equal(changing.pattern(64, 64), changing.pattern(64, 64))
    changing.eval()  # xFormers redraws in eval mode too; only constant_masking fixes the pattern
    q, k, v = qkv(1, s_q=64)
    assert not torch.equal(changing(q, k, v), changing(q, k, v))
    with pytest.raises(ValueError, match="r must be"):
        RandomAttention(r=1.5)


def test_random_key_padding_and_additive_mask():
    torch.manual_seed(1)
    attention = RandomAttention(r=0.5)
    keep = attention.pattern(10, 10)
    q, k, v = qkv(4, s_q=10)
    key_padding = torch.tensor([True] * 7 + [False] * 3).expand(4, 10)
    assert_matches(attention, q, k, v, keep & key_padding[:, None, :], key_padding_mask=key_padding)


@pytest.mark.parametrize("causal", [False, True])
def test_global_equals_dense_with_global_rows_and_columns(causal):
    flags = [False, True, False, False, False, True, False, False, False]
    attention = GlobalAttention(attention_query_mask=torch.tensor(flags)[:, None], causal=causal)
    keep = global_pattern(9, flags, causal)
    assert torch.equal(attention.pattern(9), keep)
    q, k, v = qkv(3, s_q=9)
    assert_matches(attention, q, k, v, keep)  # under causal, query 0 has no key: zeros, finite gradients


def test_global_count_form_from_yaml_and_errors():
    attention = GlobalAttention(attention_query_mask=2)
    flags = [True, True] + [False] * 5
    assert torch.equal(attention.pattern(7), global_pattern(7, flags, False))
    q, k, v = qkv(2, s_q=7)
    assert_matches(attention, q, k, v, global_pattern(7, flags, False))
    short = GlobalAttention(attention_query_mask=[True, False, False])
    with pytest.raises(ValueError, match="attention_query_mask covers 3 positions"):
        short(*qkv(2, s_q=7))
    with pytest.raises(ValueError, match="attention_query_mask"):
        GlobalAttention(attention_query_mask=torch.zeros(2, 3, dtype=torch.bool))


def test_pattern_dropout_is_only_active_in_training():
    q, k, v = qkv(2, s_q=8)
    attention = LocalAttention(window_size=3, dropout=0.5)
    attention.eval()
    torch.testing.assert_close(attention(q, k, v), reference(q, k, v, keep=local_pattern(8, 8, 3, False)))
    attention.train()
    torch.manual_seed(0)
    assert not torch.allclose(attention(q, k, v), reference(q, k, v, keep=local_pattern(8, 8, 3, False)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flex_path_matches_reference_on_gpu(dtype):
    torch.manual_seed(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, s, d = 2, 4, 300, 64
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    key_padding = torch.ones(b, 1, 1, s, dtype=torch.bool, device="cuda")
    key_padding[1, ..., 250:] = False
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 2e-4, "rtol": 2e-4}
    mechanisms = [LocalAttention(window_size=33), LocalAttention(window_size=16, causal=True),
                  RandomAttention(r=0.05), RandomAttention(r=0.05, causal=True),
                  GlobalAttention(attention_query_mask=3), GlobalAttention(attention_query_mask=3, causal=True)]
    for attention in mechanisms:
        attention = attention.cuda()
        if isinstance(attention, LocalAttention):
            attention.kernel = "flex"  # bf16 local attention would take the flash window (tested below)
        keep = attention.pattern(s, s, device="cuda")
        for kpm in (None, key_padding):
            full_keep = keep if kpm is None else keep & kpm
            out = attention(q, k, v, key_padding_mask=kpm)
            assert not attention._flex_failed, type(attention).__name__
            assert attention.last_kernel == "flex", type(attention).__name__
            torch.testing.assert_close(out.double(), reference(q, k, v, keep=full_keep), **tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_window_matches_reference_with_gradients_on_gpu(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    tolerance = {"atol": 3e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else {"atol": 4e-3, "rtol": 4e-3}
    cases = [  # (mechanism, lead dims, s_q, s_k): multi-head (b, h) and xFormers (b * h) layouts, unequal lengths
        (LocalAttention(window_size=33), (2, 3), 300, 300),
        (LocalAttention(window_size=257), (1, 2), 1000, 1000),
        (LocalAttention(window_size=16, causal=True), (2, 3), 300, 300),
        (LocalAttention(window_size=16, causal=True), (6,), 200, 300),
    ]
    for attention, lead, s_q, s_k in cases:
        q = torch.randn(*lead, s_q, 64, device="cuda", dtype=dtype, generator=g).requires_grad_()
        k, v = (torch.randn(*lead, s_k, 64, device="cuda", dtype=dtype, generator=g).requires_grad_()
                for _ in range(2))
        attention.kernel = "flash"  # auto would take FlashAttention-4 where the fa4 extra is installed
        out = attention(q, k, v)
        assert attention.last_kernel == "flash"
        keep = local_pattern(s_q, s_k, attention.window_size, attention.causal).cuda()
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        expected = reference(*leaves, keep=keep)
        torch.testing.assert_close(out.double(), expected, **tolerance)
        grad_out = torch.randn(out.shape, device="cuda", dtype=dtype, generator=g)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        expected_grads = torch.autograd.grad(expected, leaves, grad_out.double())
        for name, got, want in zip("qkv", grads, expected_grads):
            torch.testing.assert_close(got.double(), want, **tolerance, msg=lambda m, name=name: f"d{name}: {m}")
    # Where flash cannot take the call (a key padding mask, float32), the block mask runs the same pattern.
    attention = LocalAttention(window_size=33)
    attention.kernel = "flash"
    q = torch.randn(2, 3, 300, 64, device="cuda", dtype=dtype, generator=g)
    attention(q, q, q, key_padding_mask=torch.ones(2, 300, dtype=torch.bool, device="cuda"))
    assert attention.last_kernel == "flex"
    attention(q.float(), q.float(), q.float())
    assert attention.last_kernel == "flex"


def test_local_kernel_choice_is_checked_and_cpu_takes_the_masked_path():
    attention = LocalAttention(window_size=3)
    q, k, v = qkv(1, s_q=8)
    attention(q, k, v)
    assert attention.last_kernel == "masked"
    with pytest.raises(ValueError, match="kernel must be one of auto, fa4, flash, flex"):
        attention.kernel = "triton"
