"""``AttentionMask`` and dense scaled dot-product attention on ``torch.nn.functional.scaled_dot_product_attention``.

Shapes: ``q: (*batch, S_q, D)``, ``k, v: (*batch, S_k, D)`` -> ``(*batch, S_q, D)``; masks as in ``base``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mmtrain.modules.attention.base import Attention, AttentionConfig, register_attention
from mmtrain.modules.attention.fa4 import (
    fa4_attention,
    fa4_packed_attention,
    fa4_packed_supported,
    fa4_supported,
)
from mmtrain.modules.attention.sdpa_backend import fa4_preferred


class AttentionMask:
    """An additive attention mask (``-inf`` drops a position), with an ``is_causal`` flag.

    ``values`` has shape ``(batch, S_q, S_k)``; a 2-D ``(S_q, S_k)`` mask is stored as ``(1, S_q, S_k)`` (as xFormers
    does), so ``shape`` and ``ndim`` are always 3-D and the leading dimension broadcasts over the batch.
    ``seq_len`` is ``S_q`` and ``to_seq_len`` is ``S_k``. (xFormers sets ``to_seq_len`` from ``values.shape[0]``,
    which after its own unsqueeze is the batch dimension; mmtrain uses the key length, the meaning the name and
    ``make_causal``/``make_crop`` give it.)
    """

    def __init__(self, additive_mask: torch.Tensor, is_causal: bool = False) -> None:
        if additive_mask.is_floating_point() is False:
            raise ValueError("AttentionMask holds an additive float mask; use AttentionMask.from_bool for booleans")
        if additive_mask.ndim not in (2, 3):
            raise ValueError(f"an attention mask is 2-D or 3-D, got shape {tuple(additive_mask.shape)}")
        if additive_mask.ndim == 2:
            additive_mask = additive_mask.unsqueeze(0)  # a view: make_crop of a 2-D mask still shares storage
        self.values = additive_mask
        self.is_causal = is_causal
        self.seq_len = additive_mask.shape[-2]
        self.to_seq_len = additive_mask.shape[-1]

    def to_bool(self) -> torch.Tensor:
        """The mask as a bool ``(batch, S_q, S_k)`` tensor: True where the position is computed (not ``-inf``)."""
        return self.values != float("-inf")

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
        additive = torch.zeros(seq_len, to_seq_len, dtype=dtype or torch.get_default_dtype(), device=device)
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


def reject_ignored_masks(mechanism: torch.nn.Module, fourth: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                         att_mask: Any = None) -> None:
    """Raise where a forward would silently ignore a mask handed to it.

    xFormers' forwards end in ``*args, **kwargs`` and drop whatever lands there, so a mask passed one position too
    far (``attn(q, k, v, att_mask, key_padding_mask)``) or under a foreign name (``attn_mask=``) did nothing. Here a
    tensor or ``AttentionMask`` among the extra positionals or unknown keywords is an error; other extras stay
    accepted and ignored, for xFormers' call compatibility. ``fourth`` names the mechanism's 4th positional parameter.
    ``att_mask``: the one the forward received, an error for a mechanism with ``supports_attention_mask`` False.
    """
    name = type(mechanism).__name__
    takes_no_att_mask = ValueError(f"{name} takes no att_mask (supports_attention_mask is False); "
                                   "pass padding as key_padding_mask=")
    if att_mask is not None and not getattr(mechanism, "supports_attention_mask", True):
        raise takes_no_att_mask
    for position, value in enumerate(args, start=5):
        if isinstance(value, (torch.Tensor, AttentionMask)):
            raise TypeError(
                f"{name}.forward(q, k, v, {fourth}=None, ...) got a tensor as positional argument {position}, "
                "which it would ignore; pass key_padding_mask= by keyword"
            )
    for key, value in kwargs.items():
        if isinstance(value, (torch.Tensor, AttentionMask)):
            if key == "att_mask":
                raise takes_no_att_mask
            raise TypeError(f"{name}.forward got an unexpected mask argument {key!r}, which it would ignore "
                            f"(masks: {fourth}{'' if fourth == 'key_padding_mask' else ', key_padding_mask'})")


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (no dimension of ``target`` grows)."""
    try:
        return torch.broadcast_shapes(tuple(shape), tuple(target)) == torch.Size(target)
    except RuntimeError:
        return False


def shape_key_padding_mask(key_padding_mask: torch.Tensor, q: torch.Tensor, s_k: int,
                           given: tuple[int, ...] | None = None) -> torch.Tensor:
    """The key padding mask (any dtype, kept) reshaped to broadcast against ``(*batch, 1, S_k)``.

    Accepted: ``(batch, S_k)`` (repeated over heads for 3-D inputs ``(batch * heads, S, D)``; viewed as
    ``(batch, 1, 1, S_k)`` for 4-D inputs ``(batch, heads, S, D)``), ``(batch * heads, 1, S_k)``, or anything that
    broadcasts against ``(*batch, 1, S_k)`` such as the wrapper's ``(batch, 1, 1, S_k)``.

    Raises:
        ValueError: the mask does not fit; the message names the given and the expected shapes.
    """
    kpm = key_padding_mask
    given = tuple(kpm.shape) if given is None else given
    target = (*q.shape[:-2], 1, s_k)
    if q.ndim == 3:
        expected = f"(batch, {s_k}) with batch dividing {q.shape[0]}, or ({q.shape[0]}, 1, {s_k})"
    else:
        expected = f"(batch, {s_k}) or a shape broadcasting to {target}"
    if kpm.ndim == 0 or kpm.shape[-1] != s_k:
        raise ValueError(f"key_padding_mask of shape {given} does not cover the {s_k} keys: expected {expected}")
    if kpm.ndim == 2 and q.ndim == 3:
        if q.shape[0] % kpm.shape[0] != 0:
            raise ValueError(f"key_padding_mask of shape {given}: batch {kpm.shape[0]} does not divide the attention "
                             f"batch {q.shape[0]}; expected {expected}")
        kpm = kpm.repeat_interleave(q.shape[0] // kpm.shape[0], dim=0)
    elif kpm.ndim == 2 and q.ndim > 3:
        kpm = kpm.reshape(kpm.shape[0], *([1] * (q.ndim - 2)), s_k)
    if kpm.ndim == q.ndim - 1:
        kpm = kpm.unsqueeze(-2)
    if not broadcasts_to(kpm.shape, target):
        raise ValueError(f"key_padding_mask of shape {given} does not fit inputs of shape {tuple(q.shape)}: "
                         f"expected {expected}")
    return kpm


def key_padding_to_additive(key_padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if key_padding_mask.dtype == torch.bool:
        return torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device).masked_fill(
            ~key_padding_mask, float("-inf")
        )
    return key_padding_mask.to(dtype)


def shape_attention_mask(att_mask: torch.Tensor | AttentionMask | None, q: torch.Tensor,
                         k: torch.Tensor) -> torch.Tensor | None:
    """The attention mask's values, fitted to the inputs as xFormers fits them.

    - A mask made for longer sequences (``seq_len`` of a model run on shorter inputs) is cropped to
      ``(S, S)`` when ``S_q == S_k``, as ``AttentionMask.make_crop``.
    - A ``(batch, S_q, S_k)`` mask on 3-D inputs ``(batch * heads, S, D)`` applies to every head of its batch row:
      rows of ``q`` are batch-major (``b * heads + h``, as the multi-head wrapper and the key padding mask have them).
    """
    if isinstance(att_mask, AttentionMask):
        att_mask = att_mask.values
    if att_mask is None:
        return None
    s_q, s_k = q.shape[-2], k.shape[-2]
    if s_q == s_k and att_mask.ndim >= 2 and att_mask.shape[-2] >= s_q and att_mask.shape[-1] >= s_k:
        att_mask = att_mask[..., :s_q, :s_k]
    if q.ndim == 3 and att_mask.ndim == 3 and 1 < att_mask.shape[0] < q.shape[0]:
        if q.shape[0] % att_mask.shape[0]:
            raise ValueError(f"attention mask of shape {tuple(att_mask.shape)}: batch {att_mask.shape[0]} does not "
                             f"divide the attention batch {q.shape[0]} (batch * heads)")
        att_mask = att_mask.repeat_interleave(q.shape[0] // att_mask.shape[0], dim=0)
    return att_mask


def merge_masks(
    att_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
) -> torch.Tensor | None:
    """One mask (bool or additive) that broadcasts against ``(*batch, S_q, S_k)``, or None.

    ``att_mask`` as ``shape_attention_mask`` returns it. The key padding mask is shaped by ``shape_key_padding_mask``
    (``(batch, S_k)``, ``(batch * heads, 1, S_k)``, or anything broadcasting against ``(*batch, 1, S_k)``).
    """
    if key_padding_mask is None:
        return att_mask
    kpm = shape_key_padding_mask(key_padding_mask, q, k.shape[-2])
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

    accepts_head_dimension = True
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
        self._causal_mask: AttentionMask | None = None
        self._assigned_mask: AttentionMask | None = None
        self._mask_assigned = False

    @property
    def mask(self) -> AttentionMask | None:
        """xFormers' module mask: ``AttentionMask.make_causal(seq_len, to_seq_len)`` when ``causal`` and ``seq_len``
        are given, else None, until a mask is assigned.

        The causal one is built on first access and kept: forward does not need it (SDPA's ``is_causal``, or an
        explicit bottom-right band when a mask or ``S_q != S_k`` needs one, computes the causal band without an
        ``S x S`` tensor), and building it eagerly would cost ``4 S^2`` bytes per layer (1 GiB at 16k tokens) in
        every model that passes ``seq_len``.

        An assigned mask (an ``AttentionMask``, a bool tensor with True keeping, or an additive float tensor; None
        clears it) is added to every forward's ``att_mask``, cropped to shorter sequences as xFormers does. With
        ``causal`` the causal band still applies on top of it.
        """
        if self._mask_assigned:
            return self._assigned_mask
        if not (self.causal and self.seq_len):
            return None
        if self._causal_mask is None:
            self._causal_mask = AttentionMask.make_causal(self.seq_len, self.to_seq_len)
        return self._causal_mask

    @mask.setter
    def mask(self, value: AttentionMask | torch.Tensor | None) -> None:
        if isinstance(value, torch.Tensor):
            value = AttentionMask.from_bool(value) if value.dtype == torch.bool else AttentionMask(value)
        self._assigned_mask = value
        self._mask_assigned = True

    def _fa4_allowed(self) -> bool:
        """Inside ``sdpa_backend("fa4")`` and without attention dropout (FA4 has none)."""
        return fa4_preferred() and not (self.training and self.dropout > 0)

    def packed_self_attention(self, qkv: torch.Tensor, num_heads: int) -> torch.Tensor | None:
        """Unmasked self-attention on a fused projection's output ``(b, S, 3 * heads * D)`` (``[q | k | v]``) ->
        ``(b, S, heads, D)``, through FlashAttention-4 reading the three slices in place; None where FA4 does not
        take the call (then the caller splits q, k, v and calls ``forward``)."""
        if self._fa4_allowed() and fa4_packed_supported(qkv, num_heads):
            return fa4_packed_attention(qkv, num_heads, causal=self.causal)
        return None

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
        is_causal = self.causal
        # An AttentionMask's values already hold the causal band of a causal one; they are used as they are.
        att_mask = shape_attention_mask(att_mask, q, k)
        if self._assigned_mask is not None:
            assigned = shape_attention_mask(self._assigned_mask, q, k)
            att_mask = assigned if att_mask is None else key_padding_to_additive(att_mask, assigned.dtype) + assigned
        mask = merge_masks(att_mask, key_padding_mask, q, k)
        s_q, s_k = q.shape[-2], k.shape[-2]
        if (mask is None and self._fa4_allowed()
                and not (is_causal and s_q > s_k) and fa4_supported(q, k, v)):
            # FA4's causal band is aligned bottom-right, as this module's is when S_q < S_k
            return fa4_attention(q, k, v, causal=is_causal)
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
