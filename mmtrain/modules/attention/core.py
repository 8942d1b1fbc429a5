"""``AttentionMask`` and dense scaled dot-product attention on ``torch.nn.functional.scaled_dot_product_attention``.

Shapes: ``q: (*batch, S_q, D)``, ``k, v: (*batch, S_k, D)`` -> ``(*batch, S_q, D)``; masks as in ``base``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmtrain.modules.attention.base import Attention, AttentionConfig, register_attention


class AttentionMask:
    """An additive attention mask (``-inf`` drops a position), with an ``is_causal`` flag.

    ``values`` has shape ``(S_q, S_k)`` or ``(batch, S_q, S_k)``.
    """

    def __init__(self, additive_mask: torch.Tensor, is_causal: bool = False) -> None:
        if additive_mask.is_floating_point() is False:
            raise ValueError("AttentionMask holds an additive float mask; use AttentionMask.from_bool for booleans")
        if additive_mask.ndim not in (2, 3):
            raise ValueError(f"an attention mask is 2-D or 3-D, got shape {tuple(additive_mask.shape)}")
        self.values = additive_mask
        self.is_causal = is_causal

    @classmethod
    def from_bool(cls, x: torch.Tensor) -> AttentionMask:
        """True keeps a position, False drops it."""
        if x.dtype != torch.bool:
            raise ValueError(f"from_bool expects a bool tensor, got {x.dtype}")
        additive = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return cls(additive.masked_fill(~x, float("-inf")))

    @classmethod
    def from_multiplicative(cls, x: torch.Tensor) -> AttentionMask:
        """A multiplicative mask: 0 drops a position, anything else keeps it."""
        return cls.from_bool(x != 0)

    @classmethod
    def make_causal(
        cls,
        seq_len: int,
        to_seq_len: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> AttentionMask:
        to_seq_len = to_seq_len or seq_len
        keep = torch.ones(seq_len, to_seq_len, dtype=torch.bool, device=device).tril()
        additive = torch.zeros(seq_len, to_seq_len, dtype=dtype or torch.float32, device=device)
        return cls(additive.masked_fill(~keep, float("-inf")), is_causal=True)

    def make_crop(self, seq_len: int, to_seq_len: int | None = None) -> AttentionMask:
        """A cropped mask whose tensor is a view of this one."""
        to_seq_len = to_seq_len or seq_len
        return AttentionMask(self.values[..., :seq_len, :to_seq_len], is_causal=self.is_causal)

    def to(self, *args: Any, **kwargs: Any) -> AttentionMask:
        values = self.values.to(*args, **kwargs)
        if not values.is_floating_point():
            raise ValueError("an AttentionMask stays floating point")
        return AttentionMask(values, is_causal=self.is_causal)

    def __add__(self, other: AttentionMask) -> AttentionMask:
        if not isinstance(other, AttentionMask):
            return NotImplemented
        return AttentionMask(self.values + other.values, is_causal=self.is_causal or other.is_causal)

    def __repr__(self) -> str:
        return f"AttentionMask(shape={tuple(self.values.shape)}, is_causal={self.is_causal})"

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def is_sparse(self) -> bool:
        return self.values.is_sparse


def key_padding_to_additive(key_padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if key_padding_mask.dtype == torch.bool:
        return torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device).masked_fill(
            ~key_padding_mask, float("-inf")
        )
    return key_padding_mask.to(dtype)


def merge_masks(
    att_mask: torch.Tensor | AttentionMask | None,
    key_padding_mask: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
) -> torch.Tensor | None:
    """One mask (bool or additive) that broadcasts against ``(*batch, S_q, S_k)``, or None.

    A key padding mask of shape ``(batch, S_k)`` given with 3-D inputs ``(batch * heads, S, D)`` is repeated over
    the heads; otherwise it must broadcast against ``(*batch, 1, S_k)``.
    """
    if isinstance(att_mask, AttentionMask):
        att_mask = att_mask.values
    if key_padding_mask is None:
        return att_mask
    kpm = key_padding_mask
    if kpm.ndim == 2 and q.ndim == 3:
        if q.shape[0] % kpm.shape[0] != 0:
            raise ValueError(
                f"key_padding_mask batch {kpm.shape[0]} does not divide the attention batch {q.shape[0]}"
            )
        kpm = kpm.repeat_interleave(q.shape[0] // kpm.shape[0], dim=0)
    if kpm.shape[-1] != k.shape[-2]:
        raise ValueError(f"key_padding_mask covers {kpm.shape[-1]} keys, attention has {k.shape[-2]}")
    if kpm.ndim == q.ndim - 1:
        kpm = kpm.unsqueeze(-2)
    if att_mask is None:
        return kpm
    if att_mask.dtype == torch.bool and kpm.dtype == torch.bool:
        return att_mask & kpm
    dtype = att_mask.dtype if att_mask.is_floating_point() else q.dtype
    return key_padding_to_additive(att_mask, dtype) + key_padding_to_additive(kpm, dtype)


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    # Fused SDPA kernels need (batch, heads, S, D); a 3-D (batch * heads, S, D) input gets a leading 1 (a view).
    return x.unsqueeze(0) if x.ndim == 3 else x


@register_attention("scaled_dot_product", AttentionConfig)
class ScaledDotProduct(Attention):
    """Dense attention: ``softmax(q k^T / sqrt(D) + mask) v`` through ``F.scaled_dot_product_attention``.

    No ``S x S`` tensor is built when there is no mask or the mask is causal; a boolean mask goes to the kernel as
    is (True keeps), an additive mask is added to the scores.
    """

    supports_attention_mask = True
    supports_key_padding_mask = True

    def __init__(
        self,
        dropout: float = 0.0,
        causal: bool = False,
        seq_len: int | None = None,
        to_seq_len: int | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(dropout=dropout)
        self.causal = causal
        self.seq_len = seq_len
        self.to_seq_len = to_seq_len

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
        is_causal = self.causal
        if isinstance(att_mask, AttentionMask):
            # The values already hold the causal band of a causal AttentionMask; use them as they are.
            att_mask = att_mask.values
        mask = merge_masks(att_mask, key_padding_mask, q, k)
        s_q, s_k = q.shape[-2], k.shape[-2]
        if is_causal and (mask is not None or s_q != s_k):
            # With S_q < S_k (decoding after a KV cache) the queries are the last S_q positions: the causal band
            # is aligned bottom-right. SDPA's is_causal aligns top-left, so the band is built explicitly here.
            keep = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
            mask = keep if mask is None else mask
            mask = (mask & keep) if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
            is_causal = False
        if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        ndim = q.ndim
        q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
        if mask is not None:
            while mask.ndim < q4.ndim:
                mask = mask.unsqueeze(0)
        out = F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        return out.squeeze(0) if ndim == 3 else out
