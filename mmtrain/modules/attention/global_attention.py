"""Global attention (BigBird, Longformer): global tokens attend to all keys and every query attends to them.

Shapes: ``q: (*batch, S_q, D)``, ``k: (*batch, S_k, D)``, ``v: (*batch, S_k, D_v)`` -> ``(*batch, S_q, D_v)``.

Pattern: query ``i`` keeps key ``j`` when ``g[i] or g[j]`` (and ``j <= i`` when causal), where ``g`` flags the global
positions. A non-global query whose row holds no global key (possible only under ``causal``) yields zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtrain.modules.attention.base import AttentionConfig, register_attention
from mmtrain.modules.attention.pattern import KeepFn, PatternAttention


@register_attention("global", AttentionConfig)
class GlobalAttention(PatternAttention):
    """Args:
        dropout: probability of dropping an attention weight at training time.
        attention_query_mask: which positions are global. A bool tensor ``(S,)`` or ``(S, 1)`` (xFormers' form) or a
            list of bools; or an int ``n`` (the YAML-friendly form): the first ``n`` positions (e.g. a CLS token)
            are global, whatever the sequence length. A mask longer than the sequence is cropped to it.
        causal: a query never attends to later keys.
        force_sparsity: accepted for xFormers compatibility; the pattern is always computed sparsely.
    """

    def __init__(
        self,
        dropout: float = 0.0,
        attention_query_mask: torch.Tensor | Sequence[bool] | int = 1,
        causal: bool = False,
        force_sparsity: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(dropout=dropout, causal=causal, force_sparsity=force_sparsity)
        self.num_global_tokens: int | None = None
        if isinstance(attention_query_mask, bool) or attention_query_mask is None:
            raise ValueError(
                f"attention_query_mask must be a bool tensor/list or an int count, got {attention_query_mask!r}"
            )
        if isinstance(attention_query_mask, int):
            if attention_query_mask < 0:
                raise ValueError(f"attention_query_mask as a count must be >= 0, got {attention_query_mask}")
            self.num_global_tokens = attention_query_mask
            self.register_buffer("attention_query_mask", None, persistent=False)
        else:
            flags = torch.as_tensor(attention_query_mask)
            if flags.ndim == 2 and flags.shape[-1] == 1:
                flags = flags[:, 0]
            if flags.ndim != 1:
                raise ValueError(
                    f"attention_query_mask must be 1-D (S,) or (S, 1), got shape {tuple(flags.shape)}"
                )
            if flags.dtype != torch.bool:
                if not bool(((flags == 0) | (flags == 1)).all()):
                    raise ValueError("attention_query_mask holds values other than True/False (or 1/0)")
                flags = flags.bool()
            self.register_buffer("attention_query_mask", flags, persistent=False)

    def make_keep(self, s_q: int, s_k: int, device: torch.device) -> KeepFn:
        offset, causal = self.query_offset(s_q, s_k), self.causal
        if self.num_global_tokens is not None:
            count = self.num_global_tokens

            def is_global(position: torch.Tensor) -> torch.Tensor:
                return position < count
        else:
            flags = self.attention_query_mask
            if flags.shape[0] < max(s_q + offset, s_k):
                raise ValueError(
                    f"attention_query_mask covers {flags.shape[0]} positions, the sequence has {max(s_q, s_k)}"
                )
            flags = flags.to(device)

            def is_global(position: torch.Tensor) -> torch.Tensor:
                return flags[position]

        def keep(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            position = q_idx + offset
            kept = is_global(position) | is_global(kv_idx)
            if causal:
                kept = kept & (kv_idx <= position)
            return kept

        return keep

    def cache_key(self, s_q: int, s_k: int) -> tuple[Any, ...] | None:
        return (s_q, s_k)

    def extra_repr(self) -> str:
        flags = self.num_global_tokens if self.num_global_tokens is not None else "mask"
        return f"global={flags}, causal={self.causal}"
