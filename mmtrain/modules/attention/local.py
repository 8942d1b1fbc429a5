"""Sliding-window attention (RoutingTransformer, Longformer, BigBird): each query sees the keys near it.

Shapes: ``q: (*batch, S_q, D)``, ``k: (*batch, S_k, D)``, ``v: (*batch, S_k, D_v)`` -> ``(*batch, S_q, D_v)``.

Pattern (query at position ``i``, key at ``j``):
    not causal: ``|i - j| <= window_size // 2`` (``window_size`` odd: the window is split evenly around the query)
    causal:     ``0 <= i - j <= window_size``
Runs as a FlexAttention block mask on CUDA and, elsewhere, on chunks of queries against only the keys in their band.
"""

from __future__ import annotations

from typing import Any

import torch

from mmtrain.modules.attention.base import AttentionConfig, register_attention
from mmtrain.modules.attention.pattern import KeepFn, PatternAttention


@register_attention("local", AttentionConfig)
class LocalAttention(PatternAttention):
    """Args:
        dropout: probability of dropping an attention weight at training time.
        causal: a query never attends to later keys.
        window_size: overall window; odd when not causal.
        force_sparsity: accepted for xFormers compatibility; the pattern is always computed sparsely.
    """

    def __init__(
        self,
        dropout: float = 0.0,
        causal: bool = False,
        window_size: int = 5,
        force_sparsity: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(dropout=dropout, causal=causal, force_sparsity=force_sparsity)
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be a positive integer, got {window_size!r}")
        if not causal and window_size % 2 == 0:
            raise ValueError(
                f"window_size={window_size} is even: a non-causal local window is split evenly around each query, "
                "so window_size must be odd (or set causal=True)"
            )
        self.window_size = window_size

    def make_keep(self, s_q: int, s_k: int, device: torch.device) -> KeepFn:
        offset = self.query_offset(s_q, s_k)
        window = self.window_size
        if self.causal:
            def keep(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
                distance = q_idx + offset - kv_idx
                return (distance >= 0) & (distance <= window)
        else:
            half = window // 2

            def keep(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
                return (q_idx + offset - kv_idx).abs() <= half
        return keep

    def key_range(self, q_start: int, q_end: int, s_q: int, s_k: int) -> tuple[int, int]:
        offset = self.query_offset(s_q, s_k)
        if self.causal:
            lo, hi = q_start + offset - self.window_size, q_end + offset
        else:
            half = self.window_size // 2
            lo, hi = q_start + offset - half, q_end + offset + half
        return max(0, lo), min(s_k, hi)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, causal={self.causal}"
