"""2-D vision RoPE against a float64 reference written from the definition (x then y halves, positions from 1,
CLS token unrotated), its relative-position property, and clip_vision_encoder(use_rope=True)."""

import pytest
import torch

from mmtrain.models.clip import clip_vision_encoder
from mmtrain.modules import VisionRotaryPositionalEmbeddings


def vision_rope_reference(
    x: torch.Tensor, grid: int, dim: int, base: float, append_cls_token: bool
) -> torch.Tensor:
    """x (b, n_tiles * (grid**2 + 1), h, 2 * dim) float64, rotated token by token in plain loops."""
    b, s, h, d = x.shape
    tokens_per_tile = grid * grid + 1
    theta = [1.0 / base ** (2 * i / dim) for i in range(dim // 2)]
    out = x.clone()
    for token in range(s):
        place = token % tokens_per_tile
        if append_cls_token:
            patch = place if place < grid * grid else None
        else:
            patch = place - 1 if place > 0 else None
        if patch is None:  # CLS token: unchanged
            continue
        col, row = patch % grid, patch // grid
        # pair j < dim/2 rotates with the column (x), pair j >= dim/2 with the row (y); grid positions start at 1
        angles = [(col + 1) * t for t in theta] + [(row + 1) * t for t in theta]
        for j, angle in enumerate(angles):
            c = torch.tensor(angle, dtype=torch.float64).cos()
            sn = torch.tensor(angle, dtype=torch.float64).sin()
            even, odd = x[:, token, :, 2 * j], x[:, token, :, 2 * j + 1]
            out[:, token, :, 2 * j] = even * c - odd * sn
            out[:, token, :, 2 * j + 1] = odd * c + even * sn
    return out


@pytest.mark.parametrize("append_cls_token", [True, False])
@pytest.mark.parametrize("n_tiles", [1, 2])
def test_rotation_matches_float64_reference(append_cls_token: bool, n_tiles: int) -> None:
    torch.manual_seed(0)
    dim = 8  # head_dim 16: 4 pairs rotate by column, 4 by row
    rope = VisionRotaryPositionalEmbeddings(
        patch_size=2, tile_size=8, max_num_tiles=2, dim=dim, append_cls_token=append_cls_token
    )
    x = torch.randn(2, n_tiles * 17, 3, 2 * dim)
    out = rope(x)
    ref = vision_rope_reference(x.double(), grid=4, dim=dim, base=10_000, append_cls_token=append_cls_token)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_defaults_cls_untouched_and_no_state() -> None:
    rope = VisionRotaryPositionalEmbeddings(patch_size=2, tile_size=8, max_num_tiles=4, dim=4)
    assert rope.base == 10_000 and rope.append_cls_token is True and rope.patch_grid_size == 4
    assert rope.cache.shape == (17, 4, 2)
    assert rope.state_dict() == {}  # theta and cache are non-persistent buffers
    x = torch.randn(1, 2 * 17, 2, 8)
    out = rope(x, input_pos=torch.arange(34))  # input_pos is ignored, positions come from the tile layout
    torch.testing.assert_close(out[:, 16], x[:, 16], atol=0, rtol=0)
    torch.testing.assert_close(out[:, 33], x[:, 33], atol=0, rtol=0)
    assert not torch.allclose(out[:, 0], x[:, 0])  # the top-left patch is rotated (positions start at 1)
    torch.testing.assert_close(out[:, :17], rope(x[:, :17]))  # every tile gets the same rotation
    torch.testing.assert_close(out[:, 17:], rope(x[:, 17:]))


def test_bfloat16_in_bfloat16_out() -> None:
    rope = VisionRotaryPositionalEmbeddings(patch_size=2, tile_size=8, max_num_tiles=1, dim=4)
    x = torch.randn(2, 17, 2, 8)
    out = rope(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rope(x), atol=3e-2, rtol=2e-2)


def test_dot_product_depends_only_on_2d_offset() -> None:
    torch.manual_seed(1)
    grid, dim = 4, 8
    rope = VisionRotaryPositionalEmbeddings(
        patch_size=1, tile_size=grid, max_num_tiles=1, dim=dim, append_cls_token=False
    )
    q_vec, k_vec = torch.randn(2 * dim, dtype=torch.float64), torch.randn(2 * dim, dtype=torch.float64)
    tokens = grid * grid + 1
    q = rope(q_vec.float().expand(1, tokens, 1, 2 * dim).contiguous()).double()[0, :, 0]
    k = rope(k_vec.float().expand(1, tokens, 1, 2 * dim).contiguous()).double()[0, :, 0]
    scores = q @ k.T  # (tokens, tokens); token 0 is CLS

    def token(col: int, row: int) -> int:
        return 1 + row * grid + col

    by_offset: dict[tuple[int, int], list[float]] = {}
    for qr in range(grid):
        for qc in range(grid):
            for kr in range(grid):
                for kc in range(grid):
                    by_offset.setdefault((qc - kc, qr - kr), []).append(scores[token(qc, qr), token(kc, kr)].item())
    for offset, values in by_offset.items():
        assert max(values) - min(values) < 1e-4, offset
    # and it does depend on the offset: distinct offsets give distinct scores
    assert abs(by_offset[(0, 0)][0] - by_offset[(1, 0)][0]) > 1e-3
    assert abs(by_offset[(1, 0)][0] - by_offset[(0, 1)][0]) > 1e-3
    # the CLS token is unrotated on both sides: its self-score is the plain dot product
    torch.testing.assert_close(scores[0, 0], q_vec @ k_vec, atol=1e-5, rtol=1e-5)


def test_errors() -> None:
    with pytest.raises(ValueError, match="even dim"):
        VisionRotaryPositionalEmbeddings(patch_size=2, tile_size=8, max_num_tiles=1, dim=3)
    rope = VisionRotaryPositionalEmbeddings(patch_size=2, tile_size=8, max_num_tiles=1, dim=4)
    with pytest.raises(ValueError, match="not a multiple of the 2D RoPE tokens per tile 17"):
        rope(torch.randn(1, 16, 2, 8))
    with pytest.raises(ValueError, match="needs head_dim 8, got 12"):
        rope(torch.randn(1, 17, 2, 12))
    with pytest.raises(ValueError, match="divisible by 4"):
        clip_vision_encoder(tile_size=8, patch_size=2, embed_dim=12, num_layers=1, num_heads=2, use_rope=True)


def test_meta_device_init_then_reset_parameters() -> None:
    with torch.device("meta"):
        rope = VisionRotaryPositionalEmbeddings(patch_size=2, tile_size=8, max_num_tiles=1, dim=4)
    rope.to_empty(device="cpu")
    rope.reset_parameters()
    fresh = VisionRotaryPositionalEmbeddings(patch_size=2, tile_size=8, max_num_tiles=1, dim=4)
    torch.testing.assert_close(rope.cache, fresh.cache, atol=0, rtol=0)


@pytest.mark.parametrize("append_cls_token", [False, True])
def test_clip_vision_encoder_with_rope(append_cls_token: bool) -> None:
    torch.manual_seed(2)
    kwargs = dict(
        tile_size=8, patch_size=2, embed_dim=16, num_layers=2, num_heads=2, max_num_tiles=2,
        out_indices=[1], append_cls_token=append_cls_token,
    )
    plain = clip_vision_encoder(**kwargs)
    roped = clip_vision_encoder(**kwargs, use_rope=True)
    assert list(roped.state_dict()) == list(plain.state_dict())
    roped.load_state_dict(plain.state_dict(), strict=True)
    for layer in roped.layers:
        pos = layer.attn.pos_embeddings
        assert isinstance(pos, VisionRotaryPositionalEmbeddings)
        assert (pos.dim, pos.base, pos.append_cls_token, pos.patch_grid_size) == (4, 10_000, append_cls_token, 4)

    images = torch.randn(2, 1, 2, 3, 8, 8)
    aspect_ratio = torch.tensor([[[1, 2]], [[2, 1]]])
    out, hidden = roped(images, aspect_ratio)
    assert out.shape == (2, 1, 2, 17, 16)
    assert len(hidden) == 1 and hidden[0].shape == (2, 1, 2, 17, 16)
    ref_out, _ = plain(images, aspect_ratio)
    assert not torch.allclose(out, ref_out, atol=1e-4)  # the rotation changes attention

    # fewer tiles than max_num_tiles (a batch padded to its own most tiles)
    one_tile, _ = roped(images[:, :, :1], torch.tensor([[[1, 1]], [[1, 1]]]))
    assert one_tile.shape == (2, 1, 1, 17, 16)


def test_encoder_attention_rotates_q_and_k_per_tile() -> None:
    """One layer's attention in float64 against softmax(rot(q) rot(k)^T / sqrt(d)) v written out by hand."""
    torch.manual_seed(3)
    model = clip_vision_encoder(
        tile_size=8, patch_size=2, embed_dim=16, num_layers=1, num_heads=2, max_num_tiles=2, use_rope=True
    ).double()
    attn = model.layers[0].attn
    x = torch.randn(2, 2 * 17, 16, dtype=torch.float64)  # (bsz * n_imgs, n_tiles * tokens, embed_dim)
    heads, head_dim = 2, 8

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 34, heads, head_dim)

    q = vision_rope_reference(split(attn.q_proj(x)), grid=4, dim=4, base=10_000, append_cls_token=False)
    k = vision_rope_reference(split(attn.k_proj(x)), grid=4, dim=4, base=10_000, append_cls_token=False)
    v = split(attn.v_proj(x))
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5, dim=-1)
    expected = attn.output_proj(torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 34, 16))
    # the rotation runs in float32 (as in torchtune), the rest in float64
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-6)
