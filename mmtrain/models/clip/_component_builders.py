"""Builders for the CLIP vision encoder (torchtune's ``clip_vision_encoder`` and ``clip_mlp``: same arguments,
defaults and state-dict keys).

``attention`` (mmtrain's addition, default None = dense SDPA) is a registry config such as
``{"name": "local", "window_size": 9}`` handed to every layer's ``MultiHeadAttention``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from mmtrain.modules.attention import MultiHeadAttention
from mmtrain.modules.position_embeddings import (
    TiledTokenPositionalEmbedding,
    TilePositionalEmbedding,
    TokenPositionalEmbedding,
)
from mmtrain.modules.rope import VisionRotaryPositionalEmbeddings
from mmtrain.modules.transformer import FeedForward, Fp32LayerNorm, TransformerSelfAttentionLayer
from mmtrain.modules.vision_transformer import CLSProjection, VisionTransformer

__all__ = ["clip_mlp", "clip_vision_encoder"]


def clip_vision_encoder(
    tile_size: int,
    patch_size: int,
    embed_dim: int,
    num_layers: int,
    num_heads: int,
    activation: Callable = nn.SiLU,
    cls_output_dim: int = 512,
    attn_bias: bool = True,
    use_rope: bool = False,
    out_indices: list[int] | None = None,
    output_cls_projection: bool = False,
    max_num_tiles: int = 4,
    in_channels: int = 3,
    append_cls_token: bool = False,
    use_tile_pos_embed: bool = True,
    attention: dict[str, Any] | None = None,
) -> VisionTransformer:
    """The CLIP ViT: pre-norm layers (Fp32LayerNorm, MLP 4x with ``activation``), token positional embedding
    (tiled with gated tile embeddings before and after the layers when ``max_num_tiles > 1``), optional CLS
    projection.

    ``use_rope=True`` gives every layer's attention a 2-D ``VisionRotaryPositionalEmbeddings`` on queries and keys
    (``dim=head_dim // 2``, base 10000, CLS token unrotated at the end or start per ``append_cls_token``), in
    addition to the learned positional embeddings; it adds no parameters or state-dict keys.

    ``use_tile_pos_embed=False`` (Llama 4's choice) keeps one token positional embedding shared by every tile and
    drops the tile embeddings and the aspect-ratio-indexed global part, even with ``max_num_tiles > 1``.

    Output shapes: see ``VisionTransformer``; tokens per tile = (tile_size // patch_size) ** 2 + 1.

    Raises:
        ValueError: if ``embed_dim`` is not divisible by ``num_heads``, or with ``use_rope`` if ``head_dim`` is not
            divisible by 4.
    """
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}")
    head_dim = embed_dim // num_heads
    if use_rope and head_dim % 4 != 0:
        raise ValueError(
            f"use_rope needs head_dim (embed_dim // num_heads) divisible by 4 (half per image axis, in rotated "
            f"pairs), got {head_dim}"
        )
    n_tokens = max_num_tiles * ((tile_size // patch_size) ** 2 + 1)

    layers = nn.ModuleList()
    for _ in range(num_layers):
        self_attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, embed_dim, bias=attn_bias),
            k_proj=nn.Linear(embed_dim, embed_dim, bias=attn_bias),
            v_proj=nn.Linear(embed_dim, embed_dim, bias=attn_bias),
            output_proj=nn.Linear(embed_dim, embed_dim, bias=attn_bias),
            # One per layer like torchtune's deep-copied layers; the caches are small non-persistent buffers.
            pos_embeddings=(
                VisionRotaryPositionalEmbeddings(
                    patch_size=patch_size,
                    tile_size=tile_size,
                    max_num_tiles=max_num_tiles,
                    dim=head_dim // 2,
                    base=10_000,
                    append_cls_token=append_cls_token,
                )
                if use_rope
                else None
            ),
            max_seq_len=n_tokens,
            attn_dropout=0.0,
            is_causal=False,
            attention=attention,
        )
        mlp = clip_mlp(in_dim=embed_dim, hidden_dim=4 * embed_dim, out_dim=embed_dim, activation=activation())
        layers.append(
            TransformerSelfAttentionLayer(
                attn=self_attn,
                mlp=mlp,
                sa_norm=Fp32LayerNorm(embed_dim, eps=1e-5),
                mlp_norm=Fp32LayerNorm(embed_dim, eps=1e-5),
            )
        )

    if not use_tile_pos_embed or max_num_tiles == 1:
        pre_tile_pos_embed = None
        post_tile_pos_embed = None
        token_pos_embedding: nn.Module = TokenPositionalEmbedding(
            embed_dim=embed_dim, patch_size=patch_size, tile_size=tile_size
        )
    else:
        pre_tile_pos_embed = TilePositionalEmbedding(max_num_tiles=max_num_tiles, embed_dim=embed_dim)
        post_tile_pos_embed = TilePositionalEmbedding(max_num_tiles=max_num_tiles, embed_dim=embed_dim)
        token_pos_embedding = TiledTokenPositionalEmbedding(
            max_num_tiles=max_num_tiles, embed_dim=embed_dim, patch_size=patch_size, tile_size=tile_size
        )

    cls_projection = (
        CLSProjection(embed_dim=embed_dim, cls_output_dim=cls_output_dim, append_cls_token=append_cls_token)
        if output_cls_projection
        else None
    )
    return VisionTransformer(
        num_layers=num_layers,
        layer=layers,
        token_pos_embedding=token_pos_embedding,
        pre_tile_pos_embed=pre_tile_pos_embed,
        post_tile_pos_embed=post_tile_pos_embed,
        cls_projection=cls_projection,
        out_indices=out_indices,
        tile_size=tile_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        in_channels=in_channels,
        append_cls_token=append_cls_token,
    )


def clip_mlp(in_dim: int, out_dim: int, hidden_dim: int, activation: nn.Module) -> FeedForward:
    """``w2(activation(w1(x)))`` with biases: (..., in_dim) -> (..., out_dim)."""
    return FeedForward(
        gate_proj=nn.Linear(in_dim, hidden_dim), down_proj=nn.Linear(hidden_dim, out_dim), up_proj=None,
        activation=activation,
    )
