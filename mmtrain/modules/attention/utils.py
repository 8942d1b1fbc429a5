"""Mask helpers with xFormers' names (``xformers.components.attention.utils``).

``maybe_merge_masks`` folds a key padding mask into an attention mask, as the ScaledDotProduct docs suggest:

    key_padding_mask: (batch, S_src)                       bool, True keeps (as xFormers); or additive float
    att_mask:         (S_tgt, S_src), (batch * heads, S_tgt, S_src), (batch, S_tgt, S_src) or None;
                      bool (True keeps), additive float (-inf drops) or an AttentionMask
    ->                (batch * heads, S_tgt, S_src), or att_mask unchanged when key_padding_mask is None
"""

from __future__ import annotations

import torch

from mmtrain.modules.attention.core import AttentionMask, broadcasts_to
from mmtrain.modules.attention.nystrom import iterative_pinv

__all__ = ["iterative_pinv", "maybe_merge_masks", "reshape_key_padding_mask"]


def reshape_key_padding_mask(key_padding_mask: torch.Tensor, batched_dim: int) -> torch.Tensor:
    """``(batch, S) -> (batched_dim, 1, S)``, each row repeated over ``batched_dim // batch`` heads (a view)."""
    if key_padding_mask.ndim != 2:
        raise ValueError(f"key_padding_mask must be (batch, seq), got shape {tuple(key_padding_mask.shape)}")
    batch_size, src_len = key_padding_mask.shape
    if batched_dim % batch_size != 0:
        raise ValueError(f"key_padding_mask batch {batch_size} does not divide the attention batch {batched_dim}")
    return _repeat_over_heads(key_padding_mask, batch_size, src_len, batched_dim // batch_size)


def _repeat_over_heads(key_padding_mask: torch.Tensor, batch_size: int, src_len: int, num_heads: int) -> torch.Tensor:
    # Row b * num_heads + h of the result is sample b: the (batch, heads) -> batch * heads order of the wrappers.
    return (key_padding_mask.view(batch_size, 1, 1, src_len)
            .expand(-1, num_heads, -1, -1)
            .reshape(batch_size * num_heads, 1, src_len))


def maybe_merge_masks(
    att_mask: torch.Tensor | AttentionMask | None,
    key_padding_mask: torch.Tensor | None,
    batch_size: int,
    src_len: int,
    num_heads: int,
    tgt_len: int | None = None,
) -> torch.Tensor | AttentionMask | None:
    """Combine an attention mask and a key padding mask into one ``(batch * heads, tgt_len, src_len)`` mask.

    As xFormers: with no ``key_padding_mask`` the ``att_mask`` comes back unchanged (None when both are None); with
    no ``att_mask`` the key padding mask, repeated over heads and expanded over ``tgt_len`` (default ``src_len``)
    queries, comes back (a view, bool if it was bool); a bool ``att_mask`` is and-ed with it (True keeps); a float
    (additive) ``att_mask`` gets ``-inf`` where the key is padded. Beyond xFormers: an ``AttentionMask`` in gives an
    ``AttentionMask`` out, a 3-D ``att_mask`` may also have a leading ``batch`` (repeated over heads), and an additive
    float ``key_padding_mask`` is added (then the result is additive even for a bool ``att_mask``).

    Raises:
        ValueError: ``key_padding_mask`` is not ``(batch_size, src_len)``, or ``att_mask`` does not broadcast to
            ``(batch_size * num_heads, tgt_len, src_len)`` (xFormers asserts instead).
    """
    if key_padding_mask is None:
        return att_mask
    tgt_len = src_len if tgt_len is None else tgt_len
    batched_dim = batch_size * num_heads
    if tuple(key_padding_mask.shape) != (batch_size, src_len):
        raise ValueError(f"key_padding_mask must have shape (batch_size, src_len) = {(batch_size, src_len)}, "
                         f"got {tuple(key_padding_mask.shape)}")
    kpm = _repeat_over_heads(key_padding_mask, batch_size, src_len, num_heads)  # (B * H, 1, S_src)

    wrapped = isinstance(att_mask, AttentionMask)
    causal = att_mask.is_causal if isinstance(att_mask, AttentionMask) else False
    values = att_mask.values if isinstance(att_mask, AttentionMask) else att_mask
    if values is None:
        return kpm.expand(-1, tgt_len, -1)

    target = (batched_dim, tgt_len, src_len)
    if values.ndim == 3 and values.shape[0] == batch_size and batch_size != batched_dim:
        values = values.repeat_interleave(num_heads, dim=0)  # (B, T, S) -> (B * H, T, S), sample-major as kpm
    if not broadcasts_to(values.shape, target):
        raise ValueError(f"att_mask of shape {tuple(values.shape)} does not broadcast to (batch_size * num_heads, "
                         f"tgt_len, src_len) = {target}")

    if kpm.dtype == torch.bool:
        if values.dtype == torch.bool:
            merged = values.logical_and(kpm)
        else:
            merged = values.masked_fill(~kpm, float("-inf"))
    else:
        dtype = values.dtype if values.is_floating_point() else kpm.dtype
        if values.dtype == torch.bool:
            values = torch.zeros(values.shape, dtype=dtype, device=values.device).masked_fill(~values, float("-inf"))
        merged = values.to(dtype) + kpm.to(dtype)
    merged = merged.expand(target)
    if wrapped:
        return AttentionMask(merged, is_causal=causal)
    return merged
