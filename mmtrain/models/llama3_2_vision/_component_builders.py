"""Encoder builders for Llama 3.2 Vision (torchtune's ``llama3_2_vision_encoder`` and
``llama3_2_vision_projection_head``: same arguments, defaults and state-dict keys), plus the 11B-Vision preset.

``attention`` (mmtrain's addition, default None = dense SDPA) is handed to every encoder layer's
``MultiHeadAttention`` (CLIP layers and projection-head layers).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmtrain.models.clip._component_builders import clip_mlp, clip_vision_encoder
from mmtrain.models.llama3_2_vision._encoder import Llama3VisionEncoder, Llama3VisionProjectionHead
from mmtrain.modules.attention import MultiHeadAttention
from mmtrain.modules.transformer import Fp32LayerNorm, TanhGate, TransformerSelfAttentionLayer

__all__ = ["llama3_2_vision_11b_encoder", "llama3_2_vision_encoder", "llama3_2_vision_projection_head"]


def llama3_2_vision_encoder(
    *,
    patch_size: int,
    num_heads: int,
    clip_embed_dim: int,
    clip_num_layers: int,
    clip_hidden_states: list[int] | None,
    num_layers_projection: int,
    decoder_embed_dim: int,
    tile_size: int,
    max_num_tiles: int = 4,
    in_channels: int = 3,
    attention: dict[str, Any] | None = None,
) -> Llama3VisionEncoder:
    """CLIP backbone (GELU MLP, no attention bias, tiled positional embeddings) whose output and
    ``clip_hidden_states`` hidden states feed the projection head, projected to ``decoder_embed_dim``.

    images (b, i, t, c, tile_size, tile_size), aspect_ratio (b, i, 2) -> (b, i * t * ((tile_size // patch_size)**2
    + 1), decoder_embed_dim).
    """
    clip = clip_vision_encoder(
        tile_size=tile_size,
        patch_size=patch_size,
        embed_dim=clip_embed_dim,
        num_layers=clip_num_layers,
        num_heads=num_heads,
        activation=nn.GELU,
        out_indices=clip_hidden_states,
        max_num_tiles=max_num_tiles,
        in_channels=in_channels,
        attn_bias=False,
        output_cls_projection=False,
        attention=attention,
    )
    projection_head = llama3_2_vision_projection_head(
        num_layers=num_layers_projection,
        num_heads=num_heads,
        decoder_embed_dim=decoder_embed_dim,
        clip_embed_dim=clip_embed_dim,
        num_hidden_inputs=len(clip_hidden_states or []),
        attention=attention,
        max_seq_len=max_num_tiles * ((tile_size // patch_size) ** 2 + 1),
    )
    return Llama3VisionEncoder(clip=clip, projection_head=projection_head)


def llama3_2_vision_projection_head(
    *,
    num_layers: int,
    num_heads: int,
    decoder_embed_dim: int,
    clip_embed_dim: int,
    num_hidden_inputs: int,
    attention: dict[str, Any] | None = None,
    max_seq_len: int = 4096,
) -> Llama3VisionProjectionHead:
    """Gated pre-norm layers at CLIP width, then ``Linear(clip_embed_dim * (num_hidden_inputs + 1),
    decoder_embed_dim)``."""
    hidden_dim = 4 * clip_embed_dim
    head_dim = clip_embed_dim // num_heads
    layers = []
    for _ in range(num_layers):
        self_attn = MultiHeadAttention(
            embed_dim=clip_embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(clip_embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(clip_embed_dim, num_heads * head_dim, bias=False),
            v_proj=nn.Linear(clip_embed_dim, num_heads * head_dim, bias=False),
            output_proj=nn.Linear(clip_embed_dim, clip_embed_dim, bias=False),
            pos_embeddings=None,
            max_seq_len=max_seq_len,
            attn_dropout=0.0,
            is_causal=False,
            attention=attention,
        )
        mlp = clip_mlp(in_dim=clip_embed_dim, hidden_dim=hidden_dim, out_dim=clip_embed_dim, activation=nn.GELU())
        layers.append(
            TransformerSelfAttentionLayer(
                attn=self_attn,
                mlp=mlp,
                sa_norm=Fp32LayerNorm(clip_embed_dim, eps=1e-5),
                mlp_norm=Fp32LayerNorm(clip_embed_dim, eps=1e-5),
                sa_scale=TanhGate(),
                mlp_scale=TanhGate(),
            )
        )
    proj_in = clip_embed_dim * (num_hidden_inputs + 1)
    return Llama3VisionProjectionHead(
        layers=layers, output=nn.Linear(proj_in, decoder_embed_dim), num_hidden_inputs=num_hidden_inputs
    )


def llama3_2_vision_11b_encoder(
    *, max_num_tiles: int = 4, attention: dict[str, Any] | None = None
) -> Llama3VisionEncoder:
    """The published Llama 3.2 11B-Vision encoder shapes: patch 14, tile 560, width 1280, 16 heads, 32 CLIP layers,
    hidden states [3, 7, 15, 23, 30], 8 projection layers, decoder width 4096 (1601 tokens per tile)."""
    return llama3_2_vision_encoder(
        patch_size=14,
        num_heads=16,
        clip_embed_dim=1280,
        clip_num_layers=32,
        clip_hidden_states=[3, 7, 15, 23, 30],
        num_layers_projection=8,
        decoder_embed_dim=4096,
        tile_size=560,
        max_num_tiles=max_num_tiles,
        in_channels=3,
        attention=attention,
    )
