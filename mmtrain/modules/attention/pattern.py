"""Attention restricted to a sparsity pattern: the machinery shared by local, random and global attention.

Shapes: ``q: (*batch, S_q, D)``, ``k: (*batch, S_k, D)``, ``v: (*batch, S_k, D_v)`` -> ``(*batch, S_q, D_v)``, with
``*batch`` either ``batch * heads`` (xFormers) or ``(batch, heads)`` (mmtrain's multi-head wrapper).

A mechanism describes its pattern as ``keep(q_idx, kv_idx) -> bool`` over integer index tensors, never as a stored
``S_q x S_k`` tensor. Two execution paths use it:

- CUDA, no explicit ``att_mask``, no attention dropout: FlexAttention with a block mask, so only the blocks the
  pattern touches are computed (compiled once per process; block masks cached per shape when they do not depend on
  a key padding mask or a fresh random draw).
- otherwise (CPU, an explicit mask, dropout): queries in chunks; each chunk evaluates the pattern only on its own
  ``(chunk, key range)`` slice, the key range narrowed by the mechanism (a sliding window needs ``chunk + window``
  keys, not ``S_k``), and under autograd each chunk is recomputed in backward so no ``S_q x S_k`` weights are kept.

A query with no key left to attend to yields zeros (as FlexAttention does), never NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from mmtrain.modules.attention.base import Attention
from mmtrain.modules.attention.core import (
    AttentionMask,
    reject_ignored_masks,
    shape_attention_mask,
    shape_key_padding_mask,
)

logger = logging.getLogger(__name__)

KeepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Scores per chunk on the masked path: queries per chunk = this budget / number of keys in the chunk's range.
_CHUNK_ELEMENTS = 1 << 21

_MAX_CACHED_BLOCK_MASKS = 16

_flex_state: dict[str, Any] = {"mode": None}

DEFAULT_BLOCK_SIZE = 128


def set_flex_compile_mode(mode: str | None) -> None:
    """Compile mode of the FlexAttention kernels from now on (None: torch.compile's default;
    ``"max-autotune-no-cudagraphs"`` autotunes block sizes, warps and stages per shape at a compile-time cost)."""
    _flex_state.clear()
    _flex_state["mode"] = mode


def flex_functions() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """``(compiled flex_attention, compiled create_block_mask)``, or None where torch has no FlexAttention.

    ``create_block_mask`` is compiled too: uncompiled, it materializes the ``(B, H, S_q, S_k)`` mask it summarizes.
    """
    if "fns" not in _flex_state:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:  # pragma: no cover - torch >= 2.5 has it
            _flex_state["fns"] = None
        else:
            _flex_state["fns"] = (torch.compile(flex_attention, mode=_flex_state["mode"]),
                                  torch.compile(create_block_mask))
    return _flex_state["fns"]


def make_block_mask(keep4: Callable[..., torch.Tensor], batch: int | None, heads: int | None, s_q: int, s_k: int,
                    device: torch.device, block_size: int = DEFAULT_BLOCK_SIZE) -> Any:
    """A FlexAttention block mask for ``keep4(b, h, q_idx, kv_idx)``, built without an ``S_q x S_k`` tensor."""
    fns = flex_functions()
    assert fns is not None
    return fns[1](keep4, batch, heads, s_q, s_k, device=device, BLOCK_SIZE=block_size)


def normalize_key_padding_mask(key_padding_mask: torch.Tensor | None, q: torch.Tensor,
                               s_k: int) -> torch.Tensor | None:
    """A bool keep-mask broadcasting against ``(*batch, 1, S_k)`` (True keeps); shapes as ``shape_key_padding_mask``.

    Accepts bool (True keeps) or additive float (``-inf`` drops) masks.
    """
    if key_padding_mask is None:
        return None
    kpm = key_padding_mask
    if kpm.dtype != torch.bool:
        kpm = torch.isfinite(kpm) | (kpm > 0)
    return shape_key_padding_mask(kpm, q, s_k, given=tuple(key_padding_mask.shape))


def _to_4d(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        return x.unsqueeze(0)
    if x.ndim == 4:
        return x
    return x.reshape(-1, x.shape[-3], x.shape[-2], x.shape[-1])


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                             additive: torch.Tensor | None, dropout: Callable[[torch.Tensor], torch.Tensor] | None
                             ) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + additive, masked by keep) v`` with empty rows giving zeros (no NaN, no NaN grad).

    Half-precision inputs are scored in float32.
    """
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if additive is not None:
        scores = scores + additive.to(compute_dtype)
    if keep is not None:
        scores = torch.where(keep, scores, torch.full((), float("-inf"), dtype=compute_dtype, device=q.device))
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(scores - row_max)
    weights = exp / exp.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(compute_dtype).tiny)
    if dropout is not None:
        weights = dropout(weights)
    return (weights @ v.to(compute_dtype)).to(v.dtype)


class PatternAttention(Attention):
    """Base class of mechanisms defined by a sparsity pattern; subclasses implement ``make_keep``.

    ``causal`` aligns the causal band bottom-right when ``S_q < S_k`` (decoding after a KV cache): query ``i`` sits at
    absolute position ``i + S_k - S_q``.
    """

    accepts_head_dimension = True
    supports_attention_mask = True
    supports_key_padding_mask = True

    def __init__(self, dropout: float = 0.0, causal: bool = False, force_sparsity: bool = False) -> None:
        super().__init__(dropout=dropout)
        self.causal = bool(causal)
        # Kept for xFormers compatibility: the pattern is always sparse-aware here (block masks / chunked keys).
        self.force_sparsity = bool(force_sparsity)
        self._block_masks: dict[tuple[Any, ...], Any] = {}
        self._flex_failed = False
        # FlexAttention tuning, for benchmarks and experts: the block mask's block side, and kernel options
        # (torch's FlexKernelOptions: block sizes, warps, stages...). Not ROWS_GUARANTEED_SAFE for a band pattern:
        # the kernel visits partial blocks first, and a row with no key in its first block becomes NaN under it.
        self.block_size = DEFAULT_BLOCK_SIZE
        self.kernel_options: dict[str, Any] | None = None
        self.last_kernel: str | None = None  # the path the latest call took ("flex", "masked"; local adds "flash")

    def _note_kernel(self, name: str) -> None:
        if not torch.compiler.is_compiling():  # a module attribute written inside a compiled region breaks the graph
            self.last_kernel = name

    def unmasked_cuda_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """A mechanism's own kernel for a CUDA call without masks or dropout, or None to use the block mask."""
        return None

    # -- to implement -------------------------------------------------------------------------------------------
    def make_keep(self, s_q: int, s_k: int, device: torch.device) -> KeepFn:
        """``keep(q_idx, kv_idx)`` for this call's sizes; q_idx/kv_idx are integer tensors that broadcast."""
        raise NotImplementedError

    def key_range(self, q_start: int, q_end: int, s_q: int, s_k: int) -> tuple[int, int]:
        """Keys ``[lo, hi)`` that queries ``[q_start, q_end)`` may attend to (the whole sequence by default)."""
        return 0, s_k

    def cache_key(self, s_q: int, s_k: int) -> tuple[Any, ...] | None:
        """A key under which this call's block mask may be reused, or None when the pattern changes per call."""
        return (s_q, s_k)

    def query_offset(self, s_q: int, s_k: int) -> int:
        return s_k - s_q if self.causal else 0

    # -- shared -------------------------------------------------------------------------------------------------
    def pattern(self, s_q: int, s_k: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """The pattern as a bool ``(S_q, S_k)`` tensor (True keeps). For references and tests; forward never builds it."""
        s_k = s_q if s_k is None else s_k
        device = torch.device(device or "cpu")
        keep = self.make_keep(s_q, s_k, device)
        kv_idx = torch.arange(s_k, device=device)[None, :]
        out = torch.empty(s_q, s_k, dtype=torch.bool, device=device)
        for start in range(0, s_q, 1024):  # row blocks: the index arithmetic never spans S_q x S_k int64 values
            q_idx = torch.arange(start, min(s_q, start + 1024), device=device)[:, None]
            out[start:start + q_idx.shape[0]] = keep(q_idx, kv_idx)
        return out

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        att_mask: torch.Tensor | AttentionMask | None = None,
        *args: Any,
        key_padding_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        reject_ignored_masks(self, "att_mask", args, kwargs)
        s_q, s_k = q.shape[-2], k.shape[-2]
        keep = self.make_keep(s_q, s_k, q.device)
        kpm = normalize_key_padding_mask(key_padding_mask, q, s_k)
        mask = shape_attention_mask(att_mask, q, k)
        dropout_active = self.training and self.dropout > 0
        if q.is_cuda and mask is None and kpm is None and not dropout_active:
            out = self.unmasked_cuda_forward(q, k, v)
            if out is not None:
                return out
        if q.is_cuda and mask is None and not dropout_active and not self._flex_failed and flex_functions():
            try:
                out = self._flex_forward(q, k, v, keep, kpm)
            except Exception as err:  # noqa: BLE001 - unsupported head size / dtype: fall back, say why once
                self._flex_failed = True
                logger.warning("%s: FlexAttention failed (%s); using the masked path", type(self).__name__, err)
            else:
                self._note_kernel("flex")
                return out
        self._note_kernel("masked")
        return self._chunked_forward(q, k, v, keep, mask, kpm)

    def _flex_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: KeepFn,
                      kpm: torch.Tensor | None) -> torch.Tensor:
        flex_attention = flex_functions()[0]  # type: ignore[index]
        q4, k4, v4 = _to_4d(q), _to_4d(k), _to_4d(v)
        s_q, s_k = q.shape[-2], k.shape[-2]
        if kpm is None:
            cache_key = self.cache_key(s_q, s_k)
            if cache_key is not None:
                cache_key = (cache_key, self.block_size, q.device)
            block_mask = self._block_masks.get(cache_key) if cache_key is not None else None
            if block_mask is None:
                block_mask = make_block_mask(lambda b, h, qi, ki: keep(qi, ki), None, None, s_q, s_k, q.device,
                                             self.block_size)
                if cache_key is not None:
                    if len(self._block_masks) >= _MAX_CACHED_BLOCK_MASKS:  # variable lengths: keep the newest few
                        self._block_masks.pop(next(iter(self._block_masks)))
                    self._block_masks[cache_key] = block_mask
        else:
            batch, heads = q4.shape[0], q4.shape[1]
            kpm_full = kpm.expand(*q.shape[:-2], 1, s_k).reshape(batch, heads, s_k).contiguous()
            block_mask = make_block_mask(lambda b, h, qi, ki: keep(qi, ki) & kpm_full[b, h, ki], batch, heads, s_q, s_k,
                                         q.device, self.block_size)
        out = flex_attention(q4, k4, v4, block_mask=block_mask, kernel_options=self.kernel_options or None)
        return out.reshape(*q.shape[:-1], v.shape[-1])

    def _chunked_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: KeepFn,
                         mask: torch.Tensor | None, kpm: torch.Tensor | None) -> torch.Tensor:
        s_q, s_k = q.shape[-2], k.shape[-2]
        batch_elements = max(1, math.prod(q.shape[:-2]))
        # A chunk of C queries needs at most (one query's key span + C) keys; size C so that chunk fits the budget.
        lo, hi = self.key_range(s_q // 2, s_q // 2 + 1, s_q, s_k)
        span = max(1, hi - lo)
        chunk = max(1, min(s_q, _CHUNK_ELEMENTS // (batch_elements * min(s_k, 2 * span))))
        dropout = self.attn_drop if (self.training and self.dropout > 0) else None

        def one_chunk(q_start: int, q_end: int, q_c: torch.Tensor, k_all: torch.Tensor,
                      v_all: torch.Tensor) -> torch.Tensor:
            k_lo, k_hi = self.key_range(q_start, q_end, s_q, s_k)
            if k_hi <= k_lo:
                return q_c.new_zeros(*q_c.shape[:-1], v_all.shape[-1])
            q_idx = torch.arange(q_start, q_end, device=q.device)[:, None]
            kv_idx = torch.arange(k_lo, k_hi, device=q.device)[None, :]
            keep_c = keep(q_idx, kv_idx)
            additive = None
            if mask is not None:
                rows = mask if mask.shape[-2] == 1 else mask[..., q_start:q_end, :]
                cols = rows[..., k_lo:k_hi]
                if cols.dtype == torch.bool:
                    keep_c = keep_c & cols
                else:
                    additive = cols
            if kpm is not None:
                keep_c = keep_c & kpm[..., k_lo:k_hi]
            return masked_softmax_attention(q_c, k_all[..., k_lo:k_hi, :], v_all[..., k_lo:k_hi, :], keep_c,
                                            additive, dropout)

        if chunk >= s_q:
            return one_chunk(0, s_q, q, k, v)
        recompute = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        outputs = []
        for q_start in range(0, s_q, chunk):
            q_end = min(s_q, q_start + chunk)
            q_c = q[..., q_start:q_end, :]
            if recompute:
                outputs.append(checkpoint(one_chunk, q_start, q_end, q_c, k, v, use_reentrant=False))
            else:
                outputs.append(one_chunk(q_start, q_end, q_c, k, v))
        return torch.cat(outputs, dim=-2)

