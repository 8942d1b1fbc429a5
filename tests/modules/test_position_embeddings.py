"""Tile/token positional embeddings against float64 loops written the way the page describes them."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmtrain.modules import TiledTokenPositionalEmbedding, TilePositionalEmbedding, TokenPositionalEmbedding

D, TILE, PATCH, MAX_TILES = 4, 4, 2, 3  # 2x2 patches + CLS = 5 tokens per tile


def _randomize(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module.double()


ASPECT = torch.tensor([[1, 2], [2, 1], [1, 1], [3, 1]])  # image 2 has 1 real tile of 3 (the rest is padding)


def test_token_positional_embedding_same_for_every_tile():
    emb = _randomize(TokenPositionalEmbedding(D, TILE, PATCH))
    assert emb.positional_embedding.shape == (5, D)
    x = torch.randn(4, 3, 5, D, dtype=torch.float64)
    out = emb(x, ASPECT)
    for img in range(4):
        for tile in range(3):
            torch.testing.assert_close(out[img, tile], x[img, tile] + emb.positional_embedding)


def test_tiled_token_positional_embedding_matches_loop():
    emb = _randomize(TiledTokenPositionalEmbedding(MAX_TILES, D, TILE, PATCH))
    x = torch.randn(4, 3, 5, D, dtype=torch.float64)
    out = emb(x, ASPECT)
    gate = math.tanh(emb.gate.item())
    for img, (rows, cols) in enumerate(ASPECT.tolist()):
        for tile in range(3):
            expected = x[img, tile] + emb.local_token_positional_embedding * (1 - gate)
            if tile < rows * cols:
                expected = expected + gate * emb.global_token_positional_embedding[tile // cols, tile % cols]
            torch.testing.assert_close(out[img, tile], expected)


def test_tile_positional_embedding_matches_loop_and_skips_padding():
    emb = _randomize(TilePositionalEmbedding(MAX_TILES, D))
    x = torch.randn(4, 3, 5, D, dtype=torch.float64)
    out = emb(x, ASPECT)
    gate = math.tanh(emb.gate.item())
    for img, (rows, cols) in enumerate(ASPECT.tolist()):
        for tile in range(3):
            expected = x[img, tile].clone()
            if tile < rows * cols:
                expected = expected + gate * emb.embedding[tile // cols, tile % cols, 0]
            torch.testing.assert_close(out[img, tile], expected)
    # gate starts closed: a fresh module adds nothing
    fresh = TilePositionalEmbedding(MAX_TILES, D)
    xf = torch.randn(4, 3, 5, D)
    assert torch.equal(fresh(xf, ASPECT), xf)


@pytest.mark.parametrize("aspect", [(1, 5), (5, 1), (2, 2)], ids=["wide", "tall", "too_many"])
def test_aspect_ratio_the_tables_cannot_index_is_an_error(aspect):
    """max 4 tiles a side, 3 tiles given: (1, 5) / (5, 1) leave the table, (2, 2) needs 4 tiles. torchtune raises;
    clamping would hand several tiles the same embedding."""
    tiles = 5 if aspect != (2, 2) else 3
    x = torch.randn(1, tiles, 5, D)
    for module in (TilePositionalEmbedding(4, D), TiledTokenPositionalEmbedding(4, D, tile_size=4, patch_size=2)):
        with pytest.raises(ValueError, match=r"aspect_ratio must fit a grid of at most 4 x 4"):
            module(x, torch.tensor([aspect]))


def test_tile_embedding_load_interpolates_max_num_tiles():
    small = _randomize(TilePositionalEmbedding(2, D))
    big = TilePositionalEmbedding(3, D).double()
    big.load_state_dict(small.state_dict())
    old, new = small.embedding[:, :, 0], big.embedding[:, :, 0]
    # align_corners bilinear 2 -> 3: corners kept, middle row/column are averages
    for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        torch.testing.assert_close(new[2 * i, 2 * j], old[i, j])
    torch.testing.assert_close(new[1, 1], old.mean(dim=(0, 1)))
    torch.testing.assert_close(new[0, 1], (old[0, 0] + old[0, 1]) / 2)


def test_tiled_token_embedding_load_interpolates_tiles_and_grid():
    src = _randomize(TiledTokenPositionalEmbedding(2, D, tile_size=4, patch_size=2))  # grid 2, 5 tokens
    dst = TiledTokenPositionalEmbedding(3, D, tile_size=6, patch_size=2).double()  # grid 3, 10 tokens
    dst.load_state_dict(src.state_dict())
    # local: CLS kept, patch grid 2x2 -> 3x3 bilinear (align_corners): corners kept, centre is the mean
    loc_src, loc_dst = src.local_token_positional_embedding, dst.local_token_positional_embedding
    torch.testing.assert_close(loc_dst[0], loc_src[0])
    grid_src, grid_dst = loc_src[1:].reshape(2, 2, D), loc_dst[1:].reshape(3, 3, D)
    torch.testing.assert_close(grid_dst[0, 0], grid_src[0, 0])
    torch.testing.assert_close(grid_dst[2, 2], grid_src[1, 1])
    torch.testing.assert_close(grid_dst[1, 1], grid_src.mean(dim=(0, 1)))
    # global: all tiles' patches form one (2*2, 2*2) image resized to (3*3, 3*3)
    g_src, g_dst = src.global_token_positional_embedding, dst.global_token_positional_embedding
    assert g_dst.shape == (3, 3, 10, D)
    image_src = g_src[:, :, 1:].reshape(2, 2, 2, 2, D).permute(0, 2, 1, 3, 4).reshape(4, 4, D)
    image_dst = g_dst[:, :, 1:].reshape(3, 3, 3, 3, D).permute(0, 2, 1, 3, 4).reshape(9, 9, D)
    torch.testing.assert_close(image_dst[0, 0], image_src[0, 0])
    torch.testing.assert_close(image_dst[8, 8], image_src[3, 3])
    torch.testing.assert_close(image_dst[0, 8], image_src[0, 3])
    # dst column 1 sits at 1 * 3/8 of the way along the source axis (align_corners): 5/8 of column 0 + 3/8 of 1
    torch.testing.assert_close(image_dst[0, 1], (5 / 8) * image_src[0, 0] + (3 / 8) * image_src[0, 1])
    # CLS positions: their own (2, 2) -> (3, 3) grid
    torch.testing.assert_close(g_dst[:, :, 0], F.interpolate(
        g_src[:, :, 0].permute(2, 0, 1)[None], size=(3, 3), mode="bilinear", align_corners=True)[0].permute(1, 2, 0))


def test_load_errors():
    emb = TiledTokenPositionalEmbedding(2, D, TILE, PATCH)
    bad = dict(emb.state_dict())
    bad["local_token_positional_embedding"] = torch.randn(6, D)  # 5 patches: not a square grid
    with pytest.raises(ValueError, match="not squared"):
        emb.load_state_dict(bad)
    tile = TilePositionalEmbedding(2, D)
    with pytest.raises(ValueError, match="max_num_tiles_x, max_num_tiles_y"):
        tile.load_state_dict({"embedding": torch.randn(2, 3, 1, D), "gate": torch.zeros(1)})
    with pytest.raises(ValueError, match="num_tokens, tgt_emb"):
        tile.load_state_dict({"embedding": torch.randn(2, 2, 1, D + 1), "gate": torch.zeros(1)})
