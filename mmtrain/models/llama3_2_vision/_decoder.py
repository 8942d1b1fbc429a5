"""The Llama 3.2 Vision text decoder: Llama 3.1 layers with gated cross-attention fused in every k layers.

torchtune's ``llama3_2_vision_decoder`` signature and state-dict keys:
``tok_embeddings.weight``, ``tok_embeddings.fusion_embedding.weight``, ``layers.N.{attn,mlp,sa_norm,mlp_norm}...``
and, for every ``fusion_interval``-th layer, ``layers.N.fusion_layer.{attn,mlp,ca_norm,mlp_norm,ca_scale,mlp_scale}``
(the cross-attention has per-head ``q_norm``/``k_norm``), ``norm.scale``, ``output.weight``.

Shapes: tokens long (b, s), encoder_input (b, s_e, embed_dim), encoder_mask bool (b, s, s_e) -> logits (b, s, vocab).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmtrain.modules.attention import MultiHeadAttention
from mmtrain.modules.decoder import TransformerDecoder
from mmtrain.modules.fusion import FusionEmbedding, FusionLayer
from mmtrain.modules.rope import Llama3ScaledRoPE
from mmtrain.modules.transformer import (
    FeedForward,
    RMSNorm,
    TanhGate,
    TransformerCrossAttentionLayer,
    TransformerSelfAttentionLayer,
)


def scale_hidden_dim_for_mlp(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of ``multiple_of``."""
    hidden_dim = 4 * int(2 * dim / 3)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def llama3_mlp(dim: int, hidden_dim: int) -> FeedForward:
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, no biases."""
    return FeedForward(
        gate_proj=nn.Linear(dim, hidden_dim, bias=False),
        down_proj=nn.Linear(hidden_dim, dim, bias=False),
        up_proj=nn.Linear(dim, hidden_dim, bias=False),
    )


def llama3_2_vision_decoder(
    *,
    vocab_size: int,
    num_layers: int,
    fusion_interval: int,
    num_special_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    encoder_max_seq_len: int,
    rope_base: float = 500_000.0,
    intermediate_dim: int | None = None,
    attention: dict[str, Any] | None = None,
) -> TransformerDecoder:
    """Build the decoder: ``num_layers`` causal self-attention layers (GQA, Llama 3 scaled RoPE, SwiGLU, RMSNorm),
    a ``TransformerCrossAttentionLayer`` with tanh gates (initialised to 0) fused before every
    ``fusion_interval``-th layer, a ``FusionEmbedding`` with ``num_special_tokens`` new tokens, final RMSNorm and
    an untied output projection to ``vocab_size``.

    ``attention`` (a registry config such as ``{"name": "local", "window_size": 64}``) swaps the mechanism of the
    self-attention layers; cross-attention stays dense.
    """
    if fusion_interval < 1:
        raise ValueError(f"fusion_interval must be >= 1, got {fusion_interval}")
    head_dim = embed_dim // num_heads
    num_kv_heads = num_kv_heads or num_heads
    hidden_dim = intermediate_dim or scale_hidden_dim_for_mlp(embed_dim)
    rope = Llama3ScaledRoPE(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)

    def projections() -> dict[str, nn.Linear]:
        return dict(
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
        )

    layers: list[nn.Module] = []
    for idx in range(1, num_layers + 1):
        self_attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            **projections(),
            pos_embeddings=rope,  # one module shared by all layers: one cos/sin cache
            max_seq_len=max_seq_len,
            is_causal=True,
            attn_dropout=0.0,
            attention=attention,
        )
        decoder_layer = TransformerSelfAttentionLayer(
            attn=self_attn,
            mlp=llama3_mlp(embed_dim, hidden_dim),
            sa_norm=RMSNorm(embed_dim, eps=1e-5),
            mlp_norm=RMSNorm(embed_dim, eps=1e-5),
        )
        if idx % fusion_interval != 0:
            layers.append(decoder_layer)
            continue
        cross_attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            **projections(),
            q_norm=RMSNorm(head_dim, eps=1e-5),
            k_norm=RMSNorm(head_dim, eps=1e-5),
            pos_embeddings=None,
            max_seq_len=encoder_max_seq_len,
            is_causal=False,
            attn_dropout=0.0,
        )
        cross_layer = TransformerCrossAttentionLayer(
            attn=cross_attn,
            mlp=llama3_mlp(embed_dim, hidden_dim),
            # 1e-5 as Meta's reference and HF (rms_norm_eps); torchtune 0.6.1 leaves these two at RMSNorm's 1e-6.
            ca_norm=RMSNorm(embed_dim, eps=1e-5),
            mlp_norm=RMSNorm(embed_dim, eps=1e-5),
            ca_scale=TanhGate(),
            mlp_scale=TanhGate(),
        )
        layers.append(FusionLayer(layer=decoder_layer, fusion_layer=cross_layer))

    return TransformerDecoder(
        tok_embeddings=FusionEmbedding(vocab_size, num_special_tokens, embed_dim),
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=RMSNorm(embed_dim, eps=1e-5),
        output=nn.Linear(embed_dim, vocab_size, bias=False),
    )
