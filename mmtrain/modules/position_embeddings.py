"""Positional embeddings for tiled images (torchtune's CLIP embeddings: same names, shapes and state-dict keys).

Notation: ``bsz_and_n_imgs`` images, each cut into ``n_tiles`` tiles (padded to the batch's most tiles), each tile
``n_tokens_per_tile = (tile_size // patch_size) ** 2 + 1`` tokens (patches plus CLS), width ``embed_dim``.
``aspect_ratio[k] = (n_tiles_h, n_tiles_w)`` is the tile grid of image ``k`` before cropping; tile ``t`` (row-major)
is at grid cell ``(t // n_tiles_w, t % n_tiles_w)``, and tiles ``t >= n_tiles_h * n_tiles_w`` are padding.

- ``TokenPositionalEmbedding``: (n_tokens_per_tile, embed_dim), same for every tile.
- ``TiledTokenPositionalEmbedding``: local (n_tokens_per_tile, embed_dim) weighted by ``1 - tanh(gate)`` plus
  global (max_num_tiles, max_num_tiles, n_tokens_per_tile, embed_dim) picked by grid cell, weighted by
  ``tanh(gate)``; padding tiles get only the local part.
- ``TilePositionalEmbedding``: (max_num_tiles, max_num_tiles, 1, embed_dim) picked by grid cell, times
  ``tanh(gate)``, same for every token of a tile; padding tiles get nothing.

The per-image lookup is a gather rather than torchtune's Python loop over images, so there is no host sync and
``torch.compile`` sees one graph; the values are the same.

Loading a state dict made for another ``max_num_tiles`` or tile/patch grid interpolates the embeddings
(bilinear, ``align_corners=True``, CLS position handled separately) in a load_state_dict pre-hook, as torchtune.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TilePositionalEmbedding", "TiledTokenPositionalEmbedding", "TokenPositionalEmbedding"]


def _check_aspect_ratio(aspect_ratio: torch.Tensor, n_tiles: int, max_num_tiles: int) -> None:
    if torch.compiler.is_compiling():
        return
    bad = (aspect_ratio.amax(dim=-1) > max_num_tiles) | (aspect_ratio.prod(dim=-1) > n_tiles)
    message = (f"aspect_ratio must fit a grid of at most {max_num_tiles} x {max_num_tiles} tiles and at most the "
               f"{n_tiles} tiles given")
    if aspect_ratio.device.type == "cpu":
        if bad.any():
            first = aspect_ratio[bad][0].tolist()
            raise ValueError(f"{message}; got aspect_ratio {tuple(first)} (was the image transform built with a "
                             f"larger max_num_tiles than the model?)")
    elif aspect_ratio.device.type == "cuda":  # no host sync: a device-side assertion fails the step instead
        torch._assert_async(~bad.any(), message)


def _tile_grid_index(aspect_ratio: torch.Tensor, n_tiles: int, max_num_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """aspect_ratio (n, 2) -> (flat index into a (max, max) grid, valid mask), each (n, n_tiles).

    An aspect ratio the tables cannot index (a side above ``max_num_tiles``, or more tiles than the input has) is
    an error, as in torchtune, where clamping would give several tiles the same embedding.
    """
    aspect_ratio = aspect_ratio.to(torch.long)
    _check_aspect_ratio(aspect_ratio, n_tiles, max_num_tiles)
    rows, cols = aspect_ratio[:, 0:1], aspect_ratio[:, 1:2]
    tile = torch.arange(n_tiles, device=aspect_ratio.device).unsqueeze(0)
    valid = tile < rows * cols
    cols_safe = cols.clamp(min=1)
    row_idx = (tile // cols_safe).clamp(max=max_num_tiles - 1)
    col_idx = (tile % cols_safe).clamp(max=max_num_tiles - 1)
    return row_idx * max_num_tiles + col_idx, valid


def _as_plain_tensor(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """DTensor -> (full tensor, (mesh, placements)) so F.interpolate can run; plain tensors pass through."""
    if hasattr(t, "full_tensor") and hasattr(t, "device_mesh"):
        return t.full_tensor(), (t.device_mesh, t.placements)
    return t, None


def _restore(t: torch.Tensor, sharding: Any) -> torch.Tensor:
    if sharding is None:
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, device_mesh=sharding[0], placements=sharding[1])


def _grid_size(n_tokens_per_tile: int, what: str) -> int:
    grid = math.isqrt(n_tokens_per_tile - 1)
    if grid * grid != n_tokens_per_tile - 1:
        raise ValueError(
            f"Loaded {what} positional embedding has n_tokens_per_tile={n_tokens_per_tile}, "
            "which indicates a grid_size that is not squared. This is currently not supported."
        )
    return grid


class TokenPositionalEmbedding(nn.Module):
    """Token positional embedding, same for every tile. x: (..., n_tokens_per_tile, embed_dim) -> same shape."""

    def __init__(self, embed_dim: int, tile_size: int, patch_size: int) -> None:
        super().__init__()
        patch_grid_size = tile_size // patch_size
        n_tokens_per_tile = patch_grid_size**2 + 1  # +1 for the CLS token
        scale = embed_dim**-0.5
        self.positional_embedding = nn.Parameter(scale * torch.randn((n_tokens_per_tile, embed_dim)))

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        return x + self.positional_embedding


class TiledTokenPositionalEmbedding(nn.Module):
    """Gated local (same for every tile) plus global (different for every tile) token positional embedding.

    Args:
        max_num_tiles: most tiles an image can be cut into (the global table is max_num_tiles x max_num_tiles).
        embed_dim: token width.
        tile_size: tile side in pixels.
        patch_size: patch side in pixels.

    forward: x (bsz_and_n_imgs, n_tiles, n_tokens_per_tile, embed_dim), aspect_ratio (bsz_and_n_imgs, 2) ->
    same shape as x.
    """

    def __init__(self, max_num_tiles: int, embed_dim: int, tile_size: int, patch_size: int) -> None:
        super().__init__()
        patch_grid_size = tile_size // patch_size
        self.n_tokens_per_tile = patch_grid_size**2 + 1  # +1 for the CLS token
        scale = embed_dim**-0.5
        self.local_token_positional_embedding = nn.Parameter(
            scale * torch.randn((self.n_tokens_per_tile, embed_dim))
        )
        self.global_token_positional_embedding = nn.Parameter(
            scale * torch.randn(max_num_tiles, max_num_tiles, self.n_tokens_per_tile, embed_dim)
        )
        self.gate = nn.Parameter(torch.zeros(1))
        self._register_load_state_dict_pre_hook(self._load_state_dict_hook)

    @torch.no_grad()
    def _load_state_dict_hook(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Interpolate checkpoint embeddings made for another tile grid or max_num_tiles to this module's shape."""
        local_key = prefix + "local_token_positional_embedding"
        if local_key in state_dict:
            loaded, sharding = _as_plain_tensor(state_dict[local_key])
            _grid_size(loaded.shape[0], "local")
            target_grid = math.isqrt(self.local_token_positional_embedding.shape[0] - 1)
            resized = self._resize_local_position_embedding(loaded, target_grid)
            if resized.shape != self.local_token_positional_embedding.shape:
                raise ValueError(
                    f"Loaded local positional embedding has shape {tuple(resized.shape)} after interpolation. "
                    f"Expected shape {tuple(self.local_token_positional_embedding.shape)}."
                )
            state_dict[local_key] = _restore(resized, sharding)

        global_key = prefix + "global_token_positional_embedding"
        if global_key in state_dict:
            loaded, sharding = _as_plain_tensor(state_dict[global_key])
            _grid_size(loaded.shape[2], "global")
            tgt_tiles, _, tgt_tokens, _ = self.global_token_positional_embedding.shape
            resized = self._resize_global_position_embedding(loaded, tgt_tiles, math.isqrt(tgt_tokens - 1))
            if resized.shape != self.global_token_positional_embedding.shape:
                raise ValueError(
                    f"Loaded global positional embedding has shape {tuple(resized.shape)} after interpolation. "
                    f"Expected shape {tuple(self.global_token_positional_embedding.shape)}."
                )
            state_dict[global_key] = _restore(resized, sharding)

    @staticmethod
    def _resize_local_position_embedding(local_pos_embed: torch.Tensor, tgt_patch_grid_size: int) -> torch.Tensor:
        """(g*g + 1, d) -> (tgt*tgt + 1, d): bilinear over the patch grid; the CLS row is kept as is."""
        n_tokens, embed_dim = local_pos_embed.shape
        grid = math.isqrt(n_tokens - 1)
        cls_token, patches = local_pos_embed[:1], local_pos_embed[1:]
        patches = patches.reshape(1, grid, grid, embed_dim).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=[tgt_patch_grid_size, tgt_patch_grid_size], mode="bilinear",
                                align_corners=True)
        patches = patches.permute(0, 2, 3, 1).reshape(-1, embed_dim)
        return torch.cat([cls_token, patches], dim=0)

    @staticmethod
    def _resize_global_position_embedding(global_pos_embed: torch.Tensor, tgt_max_num_tiles: int,
                                          tgt_patch_grid_size: int) -> torch.Tensor:
        """(m, m, g*g + 1, d) -> (tgt_m, tgt_m, tgt_g*tgt_g + 1, d).

        The patch positions of all tiles form one (m*g, m*g) image that is resized as a whole; the CLS positions
        form an (m, m) image resized on its own.
        """
        patches = global_pos_embed[:, :, 1:, :]
        cls_embed = global_pos_embed[:, :, :1, :]
        tiles_x, tiles_y, n_patches, embed_dim = patches.shape
        grid = math.isqrt(n_patches)
        patches = patches.reshape(tiles_x, tiles_y, grid, grid, embed_dim)
        patches = patches.permute(0, 2, 1, 3, 4).reshape(tiles_x * grid, tiles_y * grid, embed_dim)
        patches = patches.unsqueeze(0).permute(0, 3, 1, 2)
        size = (tgt_max_num_tiles * tgt_patch_grid_size, tgt_max_num_tiles * tgt_patch_grid_size)
        patches = F.interpolate(patches, size=size, mode="bilinear", align_corners=True)
        patches = patches.permute(0, 2, 3, 1).squeeze(0)
        patches = patches.reshape(tgt_max_num_tiles, tgt_patch_grid_size, tgt_max_num_tiles, tgt_patch_grid_size,
                                  embed_dim)
        patches = patches.permute(0, 2, 1, 3, 4).reshape(tgt_max_num_tiles, tgt_max_num_tiles,
                                                         tgt_patch_grid_size**2, embed_dim)
        cls_embed = F.interpolate(cls_embed.permute(2, 3, 0, 1), size=(tgt_max_num_tiles, tgt_max_num_tiles),
                                  mode="bilinear", align_corners=True).permute(2, 3, 0, 1)
        return torch.cat([cls_embed, patches], dim=2)

    def forward(self, x: torch.Tensor, aspect_ratio: torch.Tensor) -> torch.Tensor:
        bsz_and_n_imgs, n_tiles, n_tokens_per_tile, embed_dim = x.shape
        gate = self.gate.tanh()
        x = x + self.local_token_positional_embedding * (1 - gate)
        max_tiles = self.global_token_positional_embedding.shape[0]
        index, valid = _tile_grid_index(aspect_ratio.reshape(-1, 2), n_tiles, max_tiles)
        table = self.global_token_positional_embedding.reshape(max_tiles * max_tiles, n_tokens_per_tile, embed_dim)
        global_embed = table[index] * valid[..., None, None].to(table.dtype)
        return x + global_embed * gate


class TilePositionalEmbedding(nn.Module):
    """Gated tile positional embedding, same for every token of a tile.

    Args:
        max_num_tiles: most tiles an image can be cut into.
        embed_dim: token width.

    forward: x (bsz_and_n_imgs, n_tiles, n_tokens, embed_dim), aspect_ratio (bsz_and_n_imgs, 2) -> same shape.
    """

    def __init__(self, max_num_tiles: int, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        scale = embed_dim**-0.5
        self.embedding = nn.Parameter(scale * torch.randn(max_num_tiles, max_num_tiles, 1, embed_dim))
        self.gate = nn.Parameter(torch.zeros(1))
        self._register_load_state_dict_pre_hook(self._load_state_dict_hook)

    @torch.no_grad()
    def _load_state_dict_hook(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Interpolate a checkpoint embedding made for another max_num_tiles to this module's shape."""
        key = prefix + "embedding"
        if key not in state_dict:
            return
        loaded, sharding = _as_plain_tensor(state_dict[key])
        tgt_tiles, _, tgt_tokens, tgt_dim = self.embedding.shape
        in_x, in_y, in_tokens, in_dim = loaded.shape
        if in_tokens != tgt_tokens or in_dim != tgt_dim:
            raise ValueError(
                "Expected embedding shape to be (..., num_tokens, tgt_emb) to match"
                f" but found shapes {tuple(self.embedding.shape)} and {tuple(loaded.shape)}"
            )
        if in_x != in_y:
            raise ValueError(
                "Expected max_num_tiles_x, max_num_tiles_y to be equal but found "
                f"(max_num_tiles_x, max_num_tiles_y, 1, embed_dim) = {tuple(loaded.shape)}"
            )
        resized = self._resize_position_embedding(loaded, tgt_max_num_tiles=tgt_tiles)
        if resized.shape != self.embedding.shape:
            raise ValueError(
                "Expected embedding shape and embedding_new.shape to match"
                f" but found shapes {tuple(self.embedding.shape)} and {tuple(resized.shape)}"
            )
        state_dict[key] = _restore(resized, sharding)

    @staticmethod
    def _resize_position_embedding(embedding: torch.Tensor, tgt_max_num_tiles: int) -> torch.Tensor:
        """(m, m, 1, d) -> (tgt, tgt, 1, d), bilinear with align_corners=True over the tile grid."""
        embedding = embedding.permute(2, 3, 0, 1)
        embedding = F.interpolate(embedding, size=(tgt_max_num_tiles, tgt_max_num_tiles), mode="bilinear",
                                  align_corners=True)
        return embedding.permute(2, 3, 0, 1)

    def forward(self, x: torch.Tensor, aspect_ratio: torch.Tensor) -> torch.Tensor:
        n_tiles = x.shape[1]
        max_tiles = self.embedding.shape[0]
        index, valid = _tile_grid_index(aspect_ratio.reshape(-1, 2), n_tiles, max_tiles)
        table = self.embedding.reshape(max_tiles * max_tiles, 1, self.embed_dim)
        tile_embed = table[index] * valid[..., None, None].to(table.dtype)
        return x + tile_embed * self.gate.tanh()
