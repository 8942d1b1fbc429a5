"""Tile-cropped Vision Transformer (torchtune's ``VisionTransformer``: same arguments, shapes, errors and keys).

An image is cut into tiles by the image transform; here each tile is cut into ``patch_grid_size ** 2`` patches by
a strided convolution, a CLS token is added per tile, positional embeddings are added, and all tiles of one image
attend to each other jointly through the transformer layers.

Shapes:
    images: (bsz, n_imgs, n_tiles, in_channels, tile_size, tile_size)
    aspect_ratio: (bsz, n_imgs, 2) tile grid (rows, cols) of each image, or None when every image is one tile
    -> x: (bsz, n_imgs, n_tiles, n_tokens, embed_dim) with n_tokens = patch_grid_size ** 2 + 1,
       or (bsz, n_imgs, n_tiles, 1, cls_output_dim) with a CLS projection
    -> hidden_states: list of len(out_indices) tensors (bsz, n_imgs, n_tiles, n_tokens, embed_dim), each taken
       before the layer of that index

State-dict keys: ``conv.weight``, ``ln_pre.*``, ``ln_post.*``, ``cls_token_embedding.weight``,
``token_pos_embedding.*``, ``pre_tile_pos_embed.*``, ``post_tile_pos_embed.*``, ``layers.{i}.*``,
``cls_projection.weight``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mmtrain.modules.transformer import Fp32LayerNorm

__all__ = ["CLSEmbedding", "CLSProjection", "VisionTransformer"]


class VisionTransformer(nn.Module):
    """ViT over tile-cropped images with optional tile positional embeddings, hidden-state outputs and CLS projection.

    Args:
        patch_size: patch side in pixels (``tile_size // patch_size`` patches per side).
        tile_size: tile side in pixels (the image side when images are not tiled).
        num_layers: number of transformer layers.
        embed_dim: token width.
        layer: one transformer layer, deep-copied ``num_layers`` times, or an ``nn.ModuleList`` of the layers.
        token_pos_embedding: ``module(x, aspect_ratio)`` adding token positional embeddings.
        pre_tile_pos_embed, post_tile_pos_embed: tile embeddings before / after the layers (None without tiling).
        cls_projection: maps (bsz, n_imgs, n_tiles, n_tokens, embed_dim) to (bsz, n_imgs, n_tiles, 1,
            cls_output_dim), which is then the only output. The seed page describes a (bsz * n_tiles, n_tokens,
            embed_dim) input; torchtune's code passes the 5-D tensor as this does, so a module written for torchtune
            works here unchanged.
        out_indices: layer indices whose inputs are returned as hidden states.
        in_channels: image channels.
        append_cls_token: put the CLS token last instead of first.

    Raises:
        ValueError: if ``tile_size`` or ``patch_size`` is not > 0, or ``len(out_indices) > num_layers``.
    """

    def __init__(
        self,
        patch_size: int,
        tile_size: int,
        num_layers: int,
        embed_dim: int,
        layer: nn.Module,
        token_pos_embedding: nn.Module,
        pre_tile_pos_embed: nn.Module | None = None,
        post_tile_pos_embed: nn.Module | None = None,
        cls_projection: nn.Module | None = None,
        out_indices: list[int] | None = None,
        in_channels: int = 3,
        append_cls_token: bool = False,
    ) -> None:
        super().__init__()
        if tile_size <= 0:
            raise ValueError("tile_size must be > 0")
        if patch_size <= 0:
            raise ValueError("patch_size must be > 0")
        if out_indices and len(out_indices) > num_layers:
            raise ValueError(f"len(out_indices) must be <= num_layers. Got out_indices={out_indices} and "
                             f"num_layers={num_layers}")

        patch_grid_size = tile_size // patch_size
        self.patches_per_tile = patch_grid_size**2
        self.out_indices = list(out_indices) if out_indices else []

        self.pre_tile_pos_embed = pre_tile_pos_embed
        self.post_tile_pos_embed = post_tile_pos_embed
        self.token_pos_embedding = token_pos_embedding
        self.cls_projection = cls_projection
        if isinstance(layer, nn.ModuleList):
            self.layers = layer
        else:
            self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])

        self.conv = nn.Conv2d(in_channels=in_channels, out_channels=embed_dim, kernel_size=(patch_size, patch_size),
                              stride=(patch_size, patch_size), bias=False)
        self.ln_post = Fp32LayerNorm(embed_dim)
        self.ln_pre = Fp32LayerNorm(embed_dim)
        self.cls_token_embedding = CLSEmbedding(embed_dim, append_cls_token=append_cls_token)

    def get_image_tokens_per_tile(self) -> int:
        return self.patches_per_tile + 1  # +1 for the CLS token

    def layer_modules(self) -> list[nn.Module]:
        """The repeated transformer layers (for per-layer sharding, checkpointing and compile)."""
        return list(self.layers)

    def forward(
        self, images: torch.Tensor, aspect_ratio: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """images (bsz, n_imgs, n_tiles, c, h, w), aspect_ratio (bsz, n_imgs, 2) or None -> (x, hidden_states).

        Raises:
            ValueError: if ``aspect_ratio`` is None but ``n_tiles > 1``.
        """
        if images.ndim != 6:
            raise ValueError(
                f"images must have shape (bsz, n_imgs, n_tiles, n_channels, tile_size, tile_size), got "
                f"{tuple(images.shape)}"
            )
        hidden_states: list[torch.Tensor] = []
        bsz, n_imgs, n_tiles, nch, w, h = images.shape
        bsz_and_n_imgs = bsz * n_imgs

        if aspect_ratio is None:
            if n_tiles > 1:
                raise ValueError(
                    f"aspect_ratio was not provided, but found n_tiles>1 for images.shape={tuple(images.shape)}. "
                    "Please provide aspect_ratio."
                )
            aspect_ratio = torch.ones((bsz_and_n_imgs, 2), dtype=torch.int, device=images.device)

        images = images.reshape(bsz_and_n_imgs * n_tiles, nch, w, h)
        aspect_ratio = aspect_ratio.reshape(bsz_and_n_imgs, 2)

        # (bsz_and_n_imgs * n_tiles, embed_dim, grid, grid) -> (bsz_and_n_imgs, n_tiles, patches, embed_dim)
        x = self.conv(images)
        x = x.reshape(bsz_and_n_imgs, n_tiles, -1, self.patches_per_tile).permute(0, 1, 3, 2)
        _, _, n_tokens, embed_dim = x.shape

        if self.pre_tile_pos_embed is not None:
            x = self.pre_tile_pos_embed(x, aspect_ratio)

        x = self.cls_token_embedding(x)
        n_tokens += 1
        x = self.token_pos_embedding(x, aspect_ratio)
        x = self.ln_pre(x)

        # All tiles of an image form one sequence.
        x = x.reshape(bsz_and_n_imgs, n_tiles * n_tokens, embed_dim)
        for layer_idx, transformer_layer in enumerate(self.layers):
            if layer_idx in self.out_indices:
                hidden_states.append(x.reshape(bsz, n_imgs, n_tiles, n_tokens, embed_dim))
            x = transformer_layer(x)

        x = self.ln_post(x)
        if self.post_tile_pos_embed is not None:
            x = x.reshape(bsz_and_n_imgs, n_tiles, n_tokens, embed_dim)
            x = self.post_tile_pos_embed(x, aspect_ratio)

        x = x.reshape(bsz, n_imgs, n_tiles, n_tokens, embed_dim)
        if self.cls_projection is not None:
            x = self.cls_projection(x)
        return x, hidden_states


class CLSEmbedding(nn.Module):
    """Adds a learned CLS token to every tile: (n, n_tiles, n_tokens, d) -> (n, n_tiles, n_tokens + 1, d)."""

    def __init__(self, embed_dim: int, append_cls_token: bool = False) -> None:
        super().__init__()
        scale = embed_dim**-0.5
        self.weight = nn.Parameter(scale * torch.randn(embed_dim))
        self.append_cls_token = append_cls_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz_and_n_imgs, n_tiles, _, embed_dim = x.shape
        cls_emb = self.weight.to(x.dtype).broadcast_to(bsz_and_n_imgs, n_tiles, 1, embed_dim)
        if self.append_cls_token:
            return torch.cat([x, cls_emb], dim=2)
        return torch.cat([cls_emb, x], dim=2)


class CLSProjection(nn.Module):
    """Linear projection of the CLS token (the first token; the last with ``append_cls_token``).

    (bsz, n_imgs, n_tiles, n_tokens, embed_dim) -> (bsz, n_imgs, n_tiles, 1, cls_output_dim).
    """

    def __init__(self, embed_dim: int, cls_output_dim: int, append_cls_token: bool = False) -> None:
        super().__init__()
        scale = embed_dim**-0.5
        self.cls_output_dim = cls_output_dim
        self.weight = nn.Parameter(scale * torch.randn(embed_dim, cls_output_dim))
        self.cls_index = -1 if append_cls_token else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, n_imgs, n_tiles, n_tokens, embed_dim = x.shape
        x = x.reshape(bsz * n_imgs * n_tiles, n_tokens, embed_dim)
        x = x[:, self.cls_index, :] @ self.weight
        return x.reshape(bsz, n_imgs, n_tiles, 1, self.cls_output_dim)
