"""Linformer attention: keys and values projected along the sequence to ``k`` rows, so cost is linear in length.

Shapes: ``q: (*batch, S_q, D)``, ``k, v: (*batch, S_k, D)`` with ``S_k <= seq_len`` -> ``(*batch, S_q, D)``.

    K' = E K,  V' = F V   (E, F: learned (k, seq_len) matrices, keys ``E.weight`` / ``F.weight`` as in xFormers)
    out = softmax(Q K'^T / sqrt(D)) V'

Shorter sequences are zero-padded to ``seq_len`` before the projection (as xFormers does). A key padding mask zeroes
the padded keys and values before the projection, so they contribute nothing to ``K'`` and ``V'``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.modules.attention.base import Attention, AttentionConfig, register_attention
from mmtrain.modules.attention.core import reject_ignored_masks
from mmtrain.modules.attention.pattern import normalize_key_padding_mask


@register_attention("linformer", AttentionConfig)
class LinformerAttention(Attention):
    """Args:
        dropout: probability of dropping an attention weight at training time.
        seq_len: the longest sequence (the projections' input size).
        k: projected length; ``seq_len // 4`` when not given.
    """

    accepts_head_dimension = True
    requires_same_k_q_dimensions = True
    supports_attention_mask = False
    supports_key_padding_mask = True

    def __init__(self, dropout: float = 0.0, seq_len: int | None = None, k: int | None = None, *args: Any,
                 causal: bool = False, **kwargs: Any) -> None:
        super().__init__(dropout=dropout)
        if causal:
            raise ValueError("LinformerAttention mixes all positions in its projection and cannot be causal "
                             "(causal=True given)")
        if seq_len is None or int(seq_len) < 1:
            raise ValueError(f"LinformerAttention needs seq_len, the longest sequence (got {seq_len!r})")
        seq_len = int(seq_len)
        k = seq_len // 4 if k is None else int(k)
        if k < 1:
            raise ValueError(f"k (the projected length) must be >= 1, got {k} (seq_len={seq_len})")
        self.seq_len = seq_len
        self.k = k
        self.E = nn.Linear(seq_len, k, bias=False)
        self.F = nn.Linear(seq_len, k, bias=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, att_mask: torch.Tensor | None = None,
                *args: Any, key_padding_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """``att_mask`` is named only so that a mask passed 4th (where the other mechanisms take it) raises instead
        of landing in ``*args`` unseen: LinformerAttention takes a ``key_padding_mask`` (by keyword) and no attention mask.
        """
        reject_ignored_masks(self, "att_mask", args, kwargs, att_mask=att_mask)
        s_k = k.shape[-2]
        if s_k > self.seq_len:
            raise ValueError(f"LinformerAttention was built for seq_len={self.seq_len}, got a sequence of {s_k}")
        keep = normalize_key_padding_mask(key_padding_mask, q, s_k)
        if keep is not None:
            keep = keep.transpose(-1, -2)  # (*batch, S_k, 1)
            k = k * keep.to(k.dtype)
            v = v * keep.to(v.dtype)
        if s_k < self.seq_len:
            k = F.pad(k, (0, 0, 0, self.seq_len - s_k))
            v = F.pad(v, (0, 0, 0, self.seq_len - s_k))
        k_projected = self.E(k.transpose(-2, -1)).transpose(-2, -1)
        v_projected = self.F(v.transpose(-2, -1)).transpose(-2, -1)
        dropout = self.dropout if self.training else 0.0
        if q.ndim == 3:
            q, k_projected, v_projected = q.unsqueeze(0), k_projected.unsqueeze(0), v_projected.unsqueeze(0)
            return F.scaled_dot_product_attention(q, k_projected, v_projected, dropout_p=dropout).squeeze(0)
        return F.scaled_dot_product_attention(q, k_projected, v_projected, dropout_p=dropout)

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, k={self.k}"
