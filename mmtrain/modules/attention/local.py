"""Sliding-window attention (RoutingTransformer, Longformer, BigBird): each query sees the keys near it.

Shapes: ``q: (*batch, S_q, D)``, ``k: (*batch, S_k, D)``, ``v: (*batch, S_k, D_v)`` -> ``(*batch, S_q, D_v)``.

Pattern (query at position ``i``, key at ``j``):
    not causal: ``|i - j| <= window_size // 2`` (``window_size`` odd: the window is split evenly around the query)
    causal:     ``0 <= i - j <= window_size``
Runs on CUDA through a kernel with its own sliding window, which visits only the key blocks of the band, when the
inputs allow it (no mask, no dropout): FlashAttention-4 where the optional ``fa4`` extra is installed (Hopper and
later; see ``mmtrain.modules.attention.fa4``), else FlashAttention-2 (``aten._flash_attention_forward`` with
``window_size_left/right``: sm80+, fp16/bf16, one head dim for q, k and v, at most 256 and a multiple of 8);
otherwise as a FlexAttention block mask on CUDA, and elsewhere on chunks of queries against only the keys in their
band.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mmtrain.modules.attention.base import AttentionConfig, register_attention
from mmtrain.modules.attention.fa4 import fa4_attention, fa4_supported
from mmtrain.modules.attention.pattern import KeepFn, PatternAttention, _to_4d

logger = logging.getLogger(__name__)

KERNELS = ("auto", "fa4", "flash", "flex")


def flash_window_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FlashAttention-2 (sm80+) takes these tensors: half precision, one head dim for q/k/v, <= 256, % 8."""
    head_dim = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
            and k.shape[-1] == head_dim and v.shape[-1] == head_dim and head_dim <= 256 and head_dim % 8 == 0
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def flash_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Query ``i`` attends keys ``j`` with ``-left <= j - i - (S_k - S_q) <= right``: one flash kernel forward,
    one backward.

    Shapes as the module's: ``(*batch, S, D)``; differentiable (aten registers the flash backward with the window).
    """
    q4, k4, v4 = _to_4d(q), _to_4d(k), _to_4d(v)
    # Flash takes (batch, seq, heads, dim) with a unit stride on dim only: the transposes are views.
    out = torch.ops.aten._flash_attention_forward(
        q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), None, None, q.shape[-2], k.shape[-2], 0.0,
        False, False, window_size_left=left, window_size_right=right)[0]
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])


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
        # Which CUDA kernel runs the band (for benchmarks and debugging): "auto" (FA4, else FlashAttention-2, where
        # they apply, else FlexAttention), "fa4" or "flash" (that kernel where it applies, else FlexAttention) or
        # "flex" (always the block mask).
        self.kernel = "auto"
        self._flash_failed = False
        self._fa4_failed = False

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        if value not in KERNELS:
            raise ValueError(f"LocalAttention.kernel must be one of {', '.join(KERNELS)}, got {value!r}")
        self._kernel = value

    def unmasked_cuda_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        window = self._window(q, k)
        if window is None or self.kernel == "flex":
            return None
        if self.kernel in ("auto", "fa4") and not self._fa4_failed and fa4_supported(q, k, v):
            try:
                out = fa4_attention(q, k, v, window=window)
            except Exception as err:  # noqa: BLE001 - a kernel FA4 cannot compile for this shape or GPU
                self._fa4_failed = True
                logger.warning("LocalAttention: FlashAttention-4 sliding window failed (%s); falling back", err)
            else:
                self._note_kernel("fa4")
                return out
        if self.kernel in ("auto", "flash") and not self._flash_failed and flash_window_supported(q, k, v):
            try:
                out = flash_window_attention(q, k, v, *window)
            except RuntimeError as err:  # an older torch without the window arguments, an unsupported GPU
                self._flash_failed = True
                logger.warning("LocalAttention: flash sliding window failed (%s); using FlexAttention", err)
            else:
                self._note_kernel("flash")
                return out
        return None

    def _window(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int] | None:
        """``(left, right)`` of the band in FlashAttention's terms (aligned bottom-right), or None where the pattern
        cannot be said so."""
        s_q, s_k = q.shape[-2], k.shape[-2]
        if self.causal:  # flash aligns the band bottom-right, as query_offset does; every row keeps its diagonal
            return (self.window_size, 0) if s_q <= s_k else None
        half = self.window_size // 2
        return (half, half) if s_q == s_k else None  # unequal lengths: the pattern is aligned top-left

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
