"""Linformer, Nystrom, OrthoFormer and FAVOR against their formulas written out in float64, and against exact
attention as their budget grows."""

import math

import pytest
import torch

from mmtrain.modules.attention import (
    FavorAttention,
    LinformerAttention,
    NystromAttention,
    OrthoFormerAttention,
)
from mmtrain.modules.attention.favor import causal_linear_attention, default_dim_features
from mmtrain.modules.attention.nystrom import iterative_pinv


def softmax_attention(q, k, v, keep=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def qkv(*lead, s, d=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(*lead, s, d, generator=g, dtype=torch.float64) for _ in range(3))


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


# -- Linformer ----------------------------------------------------------------------------------------------------
def test_linformer_matches_projection_formula_with_padding_and_key_padding():
    attention = LinformerAttention(seq_len=10, k=4).double()
    assert attention.k == 4 and LinformerAttention(seq_len=10).k == 2  # default k = seq_len // 4
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        attention.E.weight.copy_(torch.randn(4, 10, generator=g, dtype=torch.float64))
        attention.F.weight.copy_(torch.randn(4, 10, generator=g, dtype=torch.float64))
    q, k, v = qkv(3, s=7)  # shorter than seq_len: zero-padded to 10
    keep = torch.tensor([True] * 5 + [False] * 2)
    k_pad = torch.cat([k * keep[:, None], torch.zeros(3, 3, 8, dtype=torch.float64)], dim=1)
    v_pad = torch.cat([v * keep[:, None], torch.zeros(3, 3, 8, dtype=torch.float64)], dim=1)
    k_proj = attention.E.weight @ k_pad  # (3, 4, 8)
    v_proj = attention.F.weight @ v_pad
    expected = torch.softmax(q @ k_proj.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v_proj
    torch.testing.assert_close(attention(q, k, v, key_padding_mask=keep.expand(3, 7)), expected)
    assert set(attention.state_dict()) == {"E.weight", "F.weight"}


def test_linformer_with_identity_projections_is_exact_and_errors():
    attention = LinformerAttention(seq_len=9, k=9).double()
    with torch.no_grad():
        attention.E.weight.copy_(torch.eye(9))
        attention.F.weight.copy_(torch.eye(9))
    q, k, v = qkv(2, 2, s=9)
    torch.testing.assert_close(attention(q, k, v), softmax_attention(q, k, v))
    with pytest.raises(ValueError, match="seq_len=9"):
        attention(*qkv(2, s=12))
    with pytest.raises(ValueError, match="seq_len"):
        LinformerAttention()
    with pytest.raises(ValueError, match="causal"):
        LinformerAttention(seq_len=8, causal=True)


# -- Nystrom ------------------------------------------------------------------------------------------------------
def segment_means(x, m):
    """Landmarks as xFormers pools them: the last S % m segments are one token longer."""
    s = x.shape[-2]
    base = s // m
    short = m - s % m
    sizes = [base] * short + [base + 1] * (m - short)
    out, start = [], 0
    for size in sizes:
        out.append(x[..., start:start + size, :].mean(dim=-2))
        start += size
    return torch.stack(out, dim=-2)


def smooth_sequence(s, d=8, seed=0):
    """(2, s, d): piecewise-linear paths through 5 random anchors."""
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 4, s, dtype=torch.float64)
    lower = t.floor().long().clamp(max=3)
    weight = (t - lower)[:, None]
    return anchors[:, lower] * (1 - weight) + anchors[:, lower + 1] * weight


def newton_pinv(a, iterations):
    v = a.transpose(-1, -2) / a.sum(dim=-2).amax(dim=-1)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    for _ in range(iterations):
        av = a @ v
        v = 0.25 * v @ (13 * eye - av @ (15 * eye - av @ (7 * eye - av)))
    return v


@pytest.mark.parametrize("razavi", [True, False])
def test_nystrom_matches_landmark_formula(razavi):
    q, k, v = qkv(2, 2, s=13)  # 13 tokens, 4 landmarks: uneven segments
    attention = NystromAttention(num_heads=2, num_landmarks=4, use_razavi_pinverse=razavi)
    q_l, k_l = segment_means(q, 4), segment_means(k, 4)
    kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2) / math.sqrt(8), -1)
    kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2) / math.sqrt(8), -1)
    kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2) / math.sqrt(8), -1)
    inverse = newton_pinv(kernel_2, 6) if razavi else torch.linalg.pinv(kernel_2)
    torch.testing.assert_close(attention(q, k, v), kernel_1 @ inverse @ kernel_3 @ v)


def test_nystrom_key_padding_zeroes_padded_tokens_and_masks_kernel_3():
    q, k, v = qkv(4, s=12)
    keep = torch.tensor([True] * 9 + [False] * 3)
    attention = NystromAttention(num_heads=1, num_landmarks=3, use_razavi_pinverse=False)
    qz, kz = q * keep[:, None], k * keep[:, None]
    q_l, k_l = segment_means(qz, 3), segment_means(kz, 3)
    kernel_1 = torch.softmax(qz @ k_l.transpose(-1, -2) / math.sqrt(8), -1)
    kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2) / math.sqrt(8), -1)
    kernel_3 = torch.softmax((q_l @ kz.transpose(-1, -2) / math.sqrt(8)).masked_fill(~keep, float("-inf")), -1)
    expected = kernel_1 @ torch.linalg.pinv(kernel_2) @ kernel_3 @ v
    additive = torch.zeros(4, 12, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, key_padding_mask=keep.expand(4, 12)), expected)
    torch.testing.assert_close(attention(q, k, v, key_padding_mask=additive), expected)


def test_nystrom_exact_when_landmarks_cover_tokens_and_error_falls_with_landmarks():
    q, k, v = qkv(2, s=32, scale=0.5)
    exact = softmax_attention(q, k, v)
    torch.testing.assert_close(NystromAttention(num_heads=1, num_landmarks=32)(q, k, v), exact)
    causal = NystromAttention(num_heads=1, num_landmarks=32, causal=True)(q, k, v)
    torch.testing.assert_close(causal, softmax_attention(q, k, v, torch.ones(32, 32, dtype=torch.bool).tril()))
    # Landmarks are segment means, so the approximation is good where neighbouring tokens are alike: smooth data.
    q_smooth, k_smooth = smooth_sequence(32, seed=0), smooth_sequence(32, seed=1)
    exact_smooth = softmax_attention(q_smooth, k_smooth, v)
    for razavi in (False, True):
        errors = [relative_error(NystromAttention(num_heads=1, num_landmarks=m, use_razavi_pinverse=razavi)(
            q_smooth, k_smooth, v), exact_smooth) for m in (4, 8, 16)]
        assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03, errors  # 6 Newton steps limit razavi
    # A landmark per token through the landmark formula itself (pooling that keeps every token) is exact too.
    one_per_token = NystromAttention(num_heads=1, num_landmarks=31, landmark_pooling=torch.nn.Identity(),
                                     use_razavi_pinverse=False)
    torch.testing.assert_close(one_per_token(q, k, v), exact)


def test_iterative_pinv_converges_to_the_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 6, 6, generator=g, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(iterative_pinv(a, 40), torch.linalg.inv(a))
    torch.testing.assert_close(iterative_pinv(a, 40, pinverse_original_init=True), torch.linalg.inv(a))


@pytest.mark.parametrize("causal", [False, True])
def test_nystrom_conv_skip_shapes_and_gradients(causal):
    attention = NystromAttention(num_heads=2, num_landmarks=4, conv_kernel_size=3, causal=causal).double()
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, s=11))
    out = attention(q, k, v)
    assert out.shape == (2, 2, 11, 8) and torch.isfinite(out).all()
    out.sum().backward()
    assert attention.skip_connection.weight.grad.abs().sum() > 0 and q.grad.abs().sum() > 0
    # The skip adds a depthwise conv of V along the sequence, per head: centred, or looking back only when causal.
    no_skip = NystromAttention(num_heads=2, num_landmarks=4, causal=causal)
    conv = attention.skip_connection.weight.detach()[:, 0, :, 0]  # (heads, 3)
    v_pad = torch.nn.functional.pad(v.detach(), (0, 0, 2, 0) if causal else (0, 0, 1, 1))
    skip = sum(conv[None, :, i, None, None] * v_pad[:, :, i:i + 11, :] for i in range(3))
    torch.testing.assert_close(out.detach(), no_skip(q, k, v).detach() + skip)


def causal_nystrom_reference(q, k, v, m):
    """One sequence (S, D), float64, written out: query i in segment s attends exactly to its own segment's keys
    up to i, and through the Nystrom product (landmarks of segments < s, a lower-triangular landmark matrix,
    landmark rows over keys up to their segment's end) to the earlier segments; the parts are weighted by their
    masses, the earlier one counted as sum_j len_j * exp(q . k~_j)."""
    S, D = q.shape
    short = m - S % m
    lengths = [S // m] * short + [S // m + 1] * (m - short)
    starts = [sum(lengths[:j]) for j in range(m)]
    ends = [starts[j] + lengths[j] - 1 for j in range(m)]
    segment_of = [j for j in range(m) for _ in range(lengths[j])]
    q_l = torch.stack([q[starts[j]:ends[j] + 1].mean(0) for j in range(m)])
    k_l = torch.stack([k[starts[j]:ends[j] + 1].mean(0) for j in range(m)])
    e = lambda a, b: math.exp(float(a @ b) / math.sqrt(D))  # noqa: E731
    kernel_2 = torch.zeros(m, m, dtype=torch.float64)
    kernel_3 = torch.zeros(m, S, dtype=torch.float64)
    for row in range(m):
        for col in range(row + 1):
            kernel_2[row, col] = e(q_l[row], k_l[col])
        for t in range(ends[row] + 1):
            kernel_3[row, t] = e(q_l[row], k[t])
    kernel_2 /= kernel_2.sum(-1, keepdim=True)
    kernel_3 /= kernel_3.sum(-1, keepdim=True)
    landmark_values = torch.linalg.inv(kernel_2) @ kernel_3 @ v
    out = torch.zeros_like(v)
    for i in range(S):
        s = segment_of[i]
        weights = [e(q[i], k[t]) for t in range(starts[s], i + 1)]
        mass_own = sum(weights)
        own = sum(w * v[t] for w, t in zip(weights, range(starts[s], i + 1))) / mass_own
        if s == 0:
            out[i] = own
            continue
        a = [e(q[i], k_l[j]) for j in range(s)]
        earlier = sum(a[j] * landmark_values[j] for j in range(s)) / sum(a)
        mass_earlier = sum(lengths[j] * a[j] for j in range(s))
        out[i] = (mass_earlier * earlier + mass_own * own) / (mass_earlier + mass_own)
    return out


@pytest.mark.parametrize("s, m", [(11, 3), (12, 4), (9, 8)])
def test_causal_nystrom_matches_written_out_reference(s, m):
    q, k, v = qkv(2, s=s, scale=0.7)
    out = NystromAttention(num_landmarks=m, causal=True)(q, k, v)
    for row in range(2):
        torch.testing.assert_close(out[row], causal_nystrom_reference(q[row], k[row], v[row], m))


@pytest.mark.parametrize("s, m", [(16, 4), (37, 5), (20, 19)])
def test_causal_nystrom_never_looks_ahead(s, m):
    """xFormers' causal Nystrom lets earlier positions see later tokens through the landmarks; mmtrain's must not,
    with key padding and the convolution skip too."""
    torch.manual_seed(0)
    attention = NystromAttention(num_heads=2, num_landmarks=m, causal=True, conv_kernel_size=3).double()
    q, k, v = qkv(3, 2, s=s)
    keep = torch.ones(3, s, dtype=torch.bool)
    keep[1, :5] = False  # left padding
    keep[2, -4:] = False  # right padding
    cut = s // 2
    changed = [t.clone() for t in (q, k, v)]
    for t in changed:
        t[..., cut:, :] = torch.randn_like(t[..., cut:, :])
    before = attention(q, k, v, keep[:, None, None, :])
    after = attention(*changed, keep[:, None, None, :])
    assert torch.isfinite(before).all()
    torch.testing.assert_close(after[..., :cut, :], before[..., :cut, :], rtol=0, atol=1e-12)


def test_causal_nystrom_error_falls_with_landmarks_and_key_padding_is_exact_at_one_token_segments():
    q_smooth, k_smooth = smooth_sequence(32, seed=0), smooth_sequence(32, seed=1)
    _, _, v = qkv(2, s=32)
    causal = torch.ones(32, 32, dtype=torch.bool).tril()
    exact = softmax_attention(q_smooth, k_smooth, v, causal)
    errors = [relative_error(NystromAttention(num_landmarks=m, causal=True)(q_smooth, k_smooth, v), exact)
              for m in (4, 8, 16)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03, errors
    # 20 tokens, 19 landmarks: one segment of two tokens; with key padding still exact.
    q, k, v = qkv(2, s=20)
    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[1, :7] = False
    out = NystromAttention(num_landmarks=19, causal=True)(q, k, v, keep)
    expected = softmax_attention(q, k, v, torch.ones(20, 20, dtype=torch.bool).tril() & keep[:, None, :])
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1, 7:], expected[1, 7:])
    with pytest.raises(ValueError, match="landmark_pooling cannot be given with causal=True"):
        NystromAttention(num_landmarks=4, causal=True, landmark_pooling=torch.nn.Identity())


# -- OrthoFormer --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", ["orthogonal", "kmeans", "kmeans_spherical", "random"])
def test_orthoformer_matches_landmark_formula(selection):
    q, k, v = qkv(2, 2, s=16)
    attention = OrthoFormerAttention(num_landmarks=4, landmark_selection=selection)
    torch.manual_seed(5)
    out = attention(q, k, v)
    torch.manual_seed(5)
    landmarks = attention.select_landmarks(q, k)
    assert landmarks.shape == (2, 2, 4, 8)
    kernel_1 = torch.softmax(q @ landmarks.transpose(-1, -2) / math.sqrt(8), -1)
    kernel_2 = torch.softmax(landmarks @ k.transpose(-1, -2) / math.sqrt(8), -1)
    torch.testing.assert_close(out, kernel_1 @ kernel_2 @ v)


def test_orthoformer_orthogonal_landmarks_are_greedy_and_kmeans_finds_clusters():
    q, k, _ = qkv(1, s=20)
    torch.manual_seed(0)
    attention = OrthoFormerAttention(num_landmarks=3)
    landmarks = attention.select_landmarks(q, k)[0]
    unit = torch.nn.functional.normalize(q[0], dim=-1)
    chosen = [int((q[0] == landmark).all(-1).nonzero()) for landmark in landmarks]
    assert len(set(chosen)) == 3
    for step in (1, 2):  # each new landmark has the smallest largest-|cos| to those before it
        score = (unit @ unit[chosen[:step]].T).abs().amax(-1)
        score[chosen[:step]] = float("inf")
        assert chosen[step] == int(score.argmin())
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    points = (centres.repeat_interleave(10, 0) + 0.1 * torch.randn(30, 2, generator=g, dtype=torch.float64))[None]
    found = OrthoFormerAttention(num_landmarks=3, landmark_selection="kmeans").select_landmarks(points, points)[0]
    for centre in centres:
        assert (found - centre).norm(dim=-1).min() < 0.2


def test_orthoformer_exact_at_full_landmarks_key_padding_and_errors():
    q, k, v = qkv(2, s=10)
    exact = OrthoFormerAttention(num_landmarks=10)
    keep = torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(exact(q, k, v, att_mask=keep), softmax_attention(q, k, v, keep))
    padding = torch.tensor([True] * 7 + [False] * 3)
    attention = OrthoFormerAttention(num_landmarks=4)
    torch.manual_seed(0)
    out = attention(q, k, v, key_padding_mask=padding.expand(2, 10))
    torch.manual_seed(0)
    landmarks = attention.select_landmarks(q, k)
    kernel_2 = torch.softmax((landmarks @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~padding, float("-inf")), -1)
    kernel_1 = torch.softmax(q @ landmarks.transpose(-1, -2) / math.sqrt(8), -1)
    torch.testing.assert_close(out, kernel_1 @ kernel_2 @ v)
    with pytest.raises(ValueError, match="num_landmarks=12"):
        OrthoFormerAttention(num_landmarks=12)(q, k, v)
    with pytest.raises(ValueError, match="att_mask"):
        attention(q, k, v, att_mask=keep)
    with pytest.raises(ValueError, match="landmark_selection 'nearest'"):
        OrthoFormerAttention(landmark_selection="nearest")


# -- FAVOR --------------------------------------------------------------------------------------------------------
def explicit_features(attention, x):
    """phi(x) written out from the module's drawn projections W."""
    w = attention.feature_map.features.double()
    m = attention.dim_features
    xs = x * x.shape[-1] ** -0.25
    offset = -0.5 * (xs * xs).sum(-1, keepdim=True) - math.log(math.sqrt(m))
    if attention.feature_map_type.value == "sm_orf":
        return torch.exp(xs @ w + offset)
    return torch.cat([torch.exp(xs @ w + offset), torch.exp(-(xs @ w) + offset)], dim=-1)


@pytest.mark.parametrize("feature_map_type", ["sm_orf", "sm_hyp", "sm_reg"])
def test_favor_equals_explicit_feature_map_formula(feature_map_type):
    torch.manual_seed(0)
    attention = FavorAttention(dim_features=16, dim_head=8, feature_map_type=feature_map_type)
    q, k, v = qkv(2, 2, s=9)
    phi_q, phi_k = explicit_features(attention, q), explicit_features(attention, k)
    assert phi_q.shape == (2, 2, 9, 16)
    kv = phi_k.transpose(-1, -2) @ v
    expected = (phi_q @ kv) / (phi_q @ phi_k.sum(-2, keepdim=True).transpose(-1, -2))
    torch.testing.assert_close(attention(q, k, v), expected)
    # Causal: prefix sums over j <= i, written as a loop.
    attention.causal = True
    rows = []
    for i in range(9):
        numerator = phi_q[..., i:i + 1, :] @ (phi_k[..., : i + 1, :].transpose(-1, -2) @ v[..., : i + 1, :])
        denominator = phi_q[..., i:i + 1, :] @ phi_k[..., : i + 1, :].sum(-2)[..., :, None]
        rows.append(numerator / denominator)
    torch.testing.assert_close(attention(q, k, v), torch.cat(rows, dim=-2))
    # normalize_inputs subtracts a per-sequence constant inside exp: the attention output does not change.
    attention.causal = False
    attention.feature_map.normalize_inputs = True
    torch.testing.assert_close(attention(q, k, v), expected)


def test_favor_causal_prefix_sums_in_chunks_and_decoding():
    g = torch.Generator().manual_seed(0)
    phi_q, phi_k = torch.rand(2, 11, 6, generator=g, dtype=torch.float64), torch.rand(2, 11, 6, generator=g,
                                                                                        dtype=torch.float64)
    v = torch.randn(2, 11, 3, generator=g, dtype=torch.float64)
    weights = (phi_q @ phi_k.transpose(-1, -2)).tril()
    numerator, denominator = causal_linear_attention(phi_q, phi_k, v, chunk=4)
    torch.testing.assert_close(numerator, weights @ v)
    torch.testing.assert_close(denominator, weights.sum(-1, keepdim=True))
    torch.manual_seed(0)
    attention = FavorAttention(causal=True, dim_head=8)
    q, k, v = qkv(3, s=7)
    torch.testing.assert_close(attention(q[:, -2:], k, v), attention(q, k, v)[:, -2:])


@pytest.mark.parametrize("feature_map_type", ["sm_orf", "sm_hyp", "sm_reg"])
def test_favor_approaches_softmax_as_features_grow(feature_map_type):
    q, k, v = qkv(2, s=12, scale=0.5)
    exact = softmax_attention(q, k, v)
    exact_causal = softmax_attention(q, k, v, torch.ones(12, 12, dtype=torch.bool).tril())
    errors, causal_errors = [], []
    for features in (8, 256, 8192):
        torch.manual_seed(0)
        attention = FavorAttention(dim_features=features, dim_head=8, feature_map_type=feature_map_type)
        errors.append(relative_error(attention(q, k, v), exact))
        attention.causal = True
        causal_errors.append(relative_error(attention(q, k, v), exact_causal))
    if feature_map_type == "sm_reg":
        # The regularised kernel fixes every projection's norm: biased, so the error levels off above zero.
        assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors
        assert causal_errors[0] > causal_errors[2] and causal_errors[2] < 0.05, causal_errors
    else:  # unbiased estimators: the error keeps falling
        assert errors[0] > errors[1] > errors[2] and errors[2] < 0.025, errors
        assert causal_errors[0] > causal_errors[1] > causal_errors[2] and causal_errors[2] < 0.025, causal_errors


def test_orthogonal_features_are_unbiased():
    """Projections drawn in orthogonal blocks must still be Gaussian per column (QR signs fixed)."""
    from mmtrain.modules.attention.feature_maps import SMOrf

    torch.manual_seed(0)
    features = SMOrf(16384, dim_input=8).features.double()
    assert abs(features.mean().item()) < 0.02
    torch.testing.assert_close(features.pow(2).mean(), torch.tensor(1.0, dtype=torch.float64), atol=0.03, rtol=0)
    block = features[:, :8]
    gram = block.T @ block
    torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros(8, 8, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_favor_features_drawn_at_first_forward_reload_strictly():
    """Built without dim_head, the features exist only after a forward; a fresh module still loads them."""
    torch.manual_seed(0)
    trained = FavorAttention(dim_features=16)
    q, k, v = qkv(2, s=6, d=8)
    expected = trained(q, k, v)
    fresh = FavorAttention(dim_features=16)
    assert "feature_map.features" not in fresh.state_dict()
    fresh.load_state_dict(trained.state_dict())  # strict
    torch.testing.assert_close(fresh.feature_map.features, trained.feature_map.features, rtol=0, atol=0)
    torch.testing.assert_close(fresh(q, k, v), expected)


def test_favor_redraw_key_padding_defaults_and_errors():
    torch.manual_seed(0)
    attention = FavorAttention(dim_head=16, iter_before_redraw=2)
    assert attention.dim_features == default_dim_features(16) == 80
    assert "feature_map.features" in attention.state_dict()
    q, k, v = qkv(2, s=6, d=16)
    first = attention.feature_map.features.clone()
    attention.eval()
    for _ in range(3):
        attention(q, k, v)
    assert torch.equal(attention.feature_map.features, first)  # no redraw in eval mode
    attention.train()
    attention(q, k, v)
    attention(q, k, v)
    assert torch.equal(attention.feature_map.features, first)
    attention(q, k, v)  # third training call: new features
    assert not torch.equal(attention.feature_map.features, first)
    attention.eval()
    keep = torch.tensor([True] * 4 + [False] * 2)
    phi_q, phi_k = explicit_features(attention, q), explicit_features(attention, k) * keep[:, None]
    expected = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / (phi_q @ phi_k.sum(-2)[..., None])
    torch.testing.assert_close(attention(q, k, v, key_padding_mask=keep.expand(2, 6)), expected)
    with pytest.raises(ValueError, match="dim_features or dim_head"):
        FavorAttention()
    with pytest.raises(ValueError, match="feature_map_type 'sm_xyz'"):
        FavorAttention(dim_head=8, feature_map_type="sm_xyz")
    with pytest.raises(ValueError, match="dim_features must be even"):
        FavorAttention(dim_features=7, dim_head=8)


@pytest.mark.parametrize("mechanism", ["linformer", "nystrom", "favor", "orthoformer"])
def test_approximations_keep_bfloat16_inputs_finite(mechanism):
    from mmtrain.modules.attention import build_attention

    extra = {"num_landmarks": 4} if mechanism in ("nystrom", "orthoformer") else {}
    attention = build_attention({"name": mechanism, **extra}, dim_head=8, seq_len=16, num_heads=2)
    q, k, v = (t.to(torch.bfloat16) for t in qkv(2, 2, s=16))
    out = attention.to(torch.bfloat16)(q, k, v) if mechanism == "linformer" else attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 2, 16, 8) and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mechanism", ["linformer", "nystrom", "favor", "favor_causal"])
def test_bfloat16_on_gpu_stays_close_to_float64(mechanism):
    torch.manual_seed(0)
    if mechanism == "linformer":
        attention = LinformerAttention(seq_len=512, k=64)
    elif mechanism == "nystrom":
        attention = NystromAttention(num_heads=4, num_landmarks=32)
    else:
        attention = FavorAttention(dim_head=64, causal=mechanism == "favor_causal")
    q, k, v = qkv(2, 4, s=512, d=64, scale=0.5)
    expected = attention.double()(q, k, v)
    got = attention.to("cuda", torch.bfloat16)(*(t.to("cuda", torch.bfloat16) for t in (q, k, v)))
    assert relative_error(got.double().cpu(), expected) < 3e-2


def test_linformer_error_falls_as_k_grows():
    """Projections that average k equal segments of a smooth sequence: larger k, closer to exact attention."""
    q, k = smooth_sequence(32, seed=0), smooth_sequence(32, seed=1)
    v = smooth_sequence(32, seed=2)
    exact = softmax_attention(q, k, v)
    errors = []
    for projected in (2, 4, 8, 32):
        attention = LinformerAttention(seq_len=32, k=projected).double()
        segment = 32 // projected
        averaging = torch.zeros(projected, 32, dtype=torch.float64)
        for row in range(projected):
            averaging[row, row * segment:(row + 1) * segment] = 1.0 / segment
        with torch.no_grad():
            attention.E.weight.copy_(averaging)
            attention.F.weight.copy_(averaging)
        errors.append(relative_error(attention(q, k, v), exact))
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-12, errors


def test_orthoformer_error_falls_with_more_orthogonal_landmarks():
    """Two-stage attention through landmarks improves with more of them (it only becomes exact at m = S, where the
    exact path is taken: the two softmaxes do not compose into one)."""
    q, k, v = smooth_sequence(32, seed=0), smooth_sequence(32, seed=1), smooth_sequence(32, seed=2)
    exact = softmax_attention(q, k, v)
    errors = []
    for landmarks in (2, 4, 8):
        torch.manual_seed(0)
        errors.append(relative_error(OrthoFormerAttention(num_landmarks=landmarks)(q, k, v), exact))
    assert errors[0] > errors[1] > errors[2], errors
    torch.testing.assert_close(OrthoFormerAttention(num_landmarks=32)(q, k, v), exact)


@pytest.mark.parametrize("mechanism", ["linformer", "nystrom", "nystrom_causal_conv", "favor", "favor_causal"])
def test_gradients_match_finite_differences(mechanism):
    torch.manual_seed(0)
    if mechanism == "linformer":
        attention = LinformerAttention(seq_len=8, k=3)
    elif mechanism == "nystrom":
        attention = NystromAttention(num_heads=1, num_landmarks=3)
    elif mechanism == "nystrom_causal_conv":
        attention = NystromAttention(num_heads=2, num_landmarks=3, causal=True, conv_kernel_size=3)
    else:
        attention = FavorAttention(dim_features=6, dim_head=4, causal=mechanism == "favor_causal")
    attention = attention.double().eval()
    q, k, v = (t.requires_grad_() for t in qkv(2, s=7, d=4))
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v), (q, k, v))


def test_feature_maps_take_xformers_constructor_arguments():
    from mmtrain.modules.attention.feature_maps import SMHyperbolic, SMOrf, SMReg

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    for cls in (SMOrf, SMHyperbolic, SMReg):
        # xFormers' order: dim_features, iter_before_redraw, normalize_inputs, epsilon, softmax_temp
        feature_map = cls(16, 2, False, 1e-3, 0.5)
        out = feature_map(x)
        w = feature_map.features.double()
        xs = x * 0.5
        exponent = -0.5 * (xs * xs).sum(-1, keepdim=True) - math.log(math.sqrt(16)) + 1e-3
        projected = xs @ w
        if cls is not SMOrf:
            projected = torch.cat([projected, -projected], dim=-1)
        torch.testing.assert_close(out, torch.exp(projected + exponent))
        first = feature_map.features.clone()
        feature_map(x)
        assert torch.equal(feature_map.features, first)  # 2 calls on one draw
        feature_map(x)
        assert not torch.equal(feature_map.features, first)  # the third call redraws
    default = SMOrf(16, dim_input=8)
    xs = x * 8 ** -0.25  # softmax_temp=-1: the D ** -0.25 of scaled dot-product attention
    exponent = -0.5 * (xs * xs).sum(-1, keepdim=True) - math.log(4.0) + 1e-6
    torch.testing.assert_close(default(x), torch.exp(xs @ default.features.double() + exponent))
    with pytest.raises(ValueError, match="iter_before_redraw must be >= 1"):
        SMOrf(16, 0)
