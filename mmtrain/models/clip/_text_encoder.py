"""The CLIP text transformer: token + learned position embeddings, causal pre-norm layers, final LayerNorm,
pooling at the end-of-text token, and a linear projection into the joint embedding space.

Shapes:
    input_ids: long (b, s), s <= max_seq_len
    attention_mask: (b, s), 1 for real tokens, 0 for padding (None: ``input_ids != pad_token_id``, or every
        position real when ``pad_token_id`` is None)
    -> (b, output_dim) pooled and projected, not normalized

Pooling (``pool``):
    ``"eot"``: the last real token of each row (the last position where ``attention_mask`` is 1), i.e. the
    end-of-text token of any tokenizer that appends one ([SEP] for BERT vocabularies, <|endoftext|> for CLIP's BPE).
    Without a mask, real tokens are those that are not ``pad_token_id``, so ``encode_text(ids)`` (open_clip's
    call) pools the same token as ``encode_text(ids, mask)`` for padded input.
    ``"argmax"``: the position of the largest token id (open_clip's rule; right only for its BPE vocabulary where
    <|endoftext|> has the largest id).

Attention is causal, so tokens after the end-of-text token (right padding) never reach the pooled output; no
padding mask is needed and SDPA runs its ``is_causal`` kernel without building an ``s x s`` mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmtrain.modules.attention import MultiHeadAttention
from mmtrain.modules.transformer import FeedForward, Fp32LayerNorm, TransformerSelfAttentionLayer

__all__ = ["CLIPTextEncoder", "clip_text_layer"]

POOLING = ("eot", "argmax")


def clip_text_layer(
    *,
    embed_dim: int,
    num_heads: int,
    max_seq_len: int,
    mlp_ratio: float = 4.0,
    activation: type[nn.Module] = nn.GELU,
    norm_eps: float = 1e-5,
    attn_dropout: float = 0.0,
    attention: dict[str, Any] | None = None,
) -> TransformerSelfAttentionLayer:
    """One causal pre-norm block: ``x + attn(ln(x))``, then ``h + mlp(ln(h))`` with a GELU MLP (biases on)."""
    hidden_dim = int(embed_dim * mlp_ratio)
    attn = MultiHeadAttention(
        embed_dim=embed_dim,
        num_heads=num_heads,
        max_seq_len=max_seq_len,
        is_causal=True,
        attn_dropout=attn_dropout,
        attention=attention,
        bias=True,
    )
    mlp = FeedForward(
        gate_proj=nn.Linear(embed_dim, hidden_dim), down_proj=nn.Linear(hidden_dim, embed_dim), activation=activation()
    )
    return TransformerSelfAttentionLayer(
        attn, mlp, sa_norm=Fp32LayerNorm(embed_dim, eps=norm_eps), mlp_norm=Fp32LayerNorm(embed_dim, eps=norm_eps)
    )


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower (Radford et al., 2021) on mmtrain's transformer layers.

    Args:
        vocab_size: tokenizer vocabulary size.
        max_seq_len: context length (77 for CLIP).
        embed_dim: transformer width.
        num_layers: number of causal layers.
        num_heads: attention heads.
        output_dim: width of the joint embedding (``text_projection``).
        mlp_ratio: MLP hidden width / ``embed_dim``.
        activation: MLP non-linearity class.
        norm_eps: LayerNorm epsilon.
        attn_dropout: attention dropout.
        attention: attention mechanism config for every layer (``{"name": "scaled_dot_product"}`` when None).
        pool: ``"eot"`` or ``"argmax"`` (see the module docstring).
        pad_token_id: the tokenizer's padding id, read when no ``attention_mask`` is given (``"eot"`` pooling
            pools the last token that is not padding). 0 is [PAD] in mmtrain's WordPiece tokenizers (BERT, MiniLM,
            shapes) and open_clip's BPE pad value. None: without a mask every position counts as real.

    Raises:
        ValueError: for an unknown ``pool``, or input longer than ``max_seq_len``.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        max_seq_len: int = 77,
        embed_dim: int = 512,
        num_layers: int = 12,
        num_heads: int = 8,
        output_dim: int = 512,
        mlp_ratio: float = 4.0,
        activation: type[nn.Module] = nn.GELU,
        norm_eps: float = 1e-5,
        attn_dropout: float = 0.0,
        attention: dict[str, Any] | None = None,
        pool: str = "eot",
        pad_token_id: int | None = 0,
    ) -> None:
        super().__init__()
        if pool not in POOLING:
            raise ValueError(f"pool must be one of {POOLING}, got {pool!r}")
        self.max_seq_len = max_seq_len
        self.pool = pool
        self.pad_token_id = pad_token_id
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.position_embedding = nn.Parameter(torch.empty(max_seq_len, embed_dim))
        self.layers = nn.ModuleList(
            clip_text_layer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                max_seq_len=max_seq_len,
                mlp_ratio=mlp_ratio,
                activation=activation,
                norm_eps=norm_eps,
                attn_dropout=attn_dropout,
                attention=attention,
            )
            for _ in range(num_layers)
        )
        self.final_norm = Fp32LayerNorm(embed_dim, eps=norm_eps)
        self.text_projection = nn.Linear(embed_dim, output_dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """open_clip's initialisation: small embeddings, residual projections scaled by depth."""
        width = self.token_embedding.embedding_dim
        num_layers = max(len(self.layers), 1)
        proj_std = width**-0.5 * (2 * num_layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        for layer in self.layers:
            for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj):
                nn.init.normal_(proj.weight, std=attn_std)
                nn.init.zeros_(proj.bias)
            nn.init.normal_(layer.attn.output_proj.weight, std=proj_std)
            nn.init.zeros_(layer.attn.output_proj.bias)
            nn.init.normal_(layer.mlp.w1.weight, std=fc_std)
            nn.init.zeros_(layer.mlp.w1.bias)
            nn.init.normal_(layer.mlp.w2.weight, std=proj_std)
            nn.init.zeros_(layer.mlp.w2.bias)
        nn.init.normal_(self.text_projection.weight, std=attn_std)

    def pool_indices(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(b, s) -> long (b,): the position pooled for each row."""
        if self.pool == "argmax":
            return input_ids.argmax(dim=-1)
        seq_len = input_ids.shape[-1]
        if attention_mask is None and self.pad_token_id is not None:
            attention_mask = input_ids != self.pad_token_id
        if attention_mask is None:
            return torch.full(input_ids.shape[:1], seq_len - 1, dtype=torch.long, device=input_ids.device)
        positions = torch.arange(seq_len, device=input_ids.device)
        # Last position holding a real token; works for right and left padding, and stays on device (no sync).
        return (attention_mask.to(torch.long) * (positions + 1)).argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (b, s), attention_mask (b, s) -> (b, output_dim)."""
        seq_len = input_ids.shape[-1]
        if seq_len > self.max_seq_len:
            raise ValueError(f"text of {seq_len} tokens is longer than the context length {self.max_seq_len}")
        x = self.token_embedding(input_ids) + self.position_embedding[:seq_len]
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        index = self.pool_indices(input_ids, attention_mask)
        pooled = x[torch.arange(x.shape[0], device=x.device), index]
        return self.text_projection(pooled)

    def extra_repr(self) -> str:
        return f"max_seq_len={self.max_seq_len}, pool={self.pool!r}, pad_token_id={self.pad_token_id}"

