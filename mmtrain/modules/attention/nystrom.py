"""Nystrom attention (Nystromformer, Xiong et al. 2021): softmax attention through ``m`` landmarks.

Shapes: ``q, k: (*batch, S, D)``, ``v: (*batch, S, D_v)`` -> ``(*batch, S, D_v)`` (self-attention: one length).

With landmarks ``Q~ = pool(Q)``, ``K~ = pool(K)`` (``m`` segment means unless ``landmark_pooling`` is given):

    out = softmax(Q K~^T / sqrt(D)) · pinv(softmax(Q~ K~^T / sqrt(D))) · softmax(Q~ K^T / sqrt(D) + mask) V

``pinv`` is the iterative (Razavi et al.) Newton-Schulz pseudo-inverse with ``inv_iterations`` steps unless
``use_razavi_pinverse=False`` (then ``torch.linalg.pinv``). Memory is linear in ``S``. With ``num_landmarks >= S``
it is exact softmax attention (as in xFormers). ``conv_kernel_size`` adds the depthwise convolution skip over ``V``
(per head, along the sequence); ``v_skip_connection`` replaces it with any module on ``(batch, heads, S, D_v)``.
Under ``causal`` the three kernels get xFormers' triangular masks (index ``i`` may use landmark/key ``j <= i``).

``forward(q, k, v, key_padding_mask=None)`` takes the key padding mask 4th, as on xFormers' page; a mask whose
dimensions do not fit the inputs is ignored with a ``UserWarning`` naming the given and expected shapes (the page:
"If dimensions are not correct, the mask will be ignored").
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.modules.attention.base import Attention, AttentionConfig, register_attention
from mmtrain.modules.attention.core import reject_ignored_masks
from mmtrain.modules.attention.pattern import normalize_key_padding_mask


class AvgPool(nn.Module):
    """Landmarks as means of ``n`` contiguous segments: ``(*batch, S, D) -> (*batch, n, D)``.

    When ``S % n != 0`` the last ``S % n`` segments are one token longer (as in xFormers).
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, seq_len, dim = x.shape
        segment = seq_len // self.n
        if segment < 1:
            raise ValueError(f"cannot pool {seq_len} tokens into {self.n} landmarks")
        if seq_len % self.n == 0:
            return x.reshape(*lead, self.n, segment, dim).mean(dim=-2)
        short = self.n - seq_len % self.n
        head = x[..., : short * segment, :].reshape(*lead, short, segment, dim).mean(dim=-2)
        tail = x[..., short * segment :, :].reshape(*lead, self.n - short, segment + 1, dim).mean(dim=-2)
        return torch.cat((head, tail), dim=-2)


def iterative_pinv(matrix: torch.Tensor, n_iter: int = 6, pinverse_original_init: bool = False) -> torch.Tensor:
    """Newton-Schulz style pseudo-inverse of ``(*batch, m, m)`` softmax matrices (Nystromformer, eq. 16).

    ``V0 = K^T / max_j(sum_i K_ij)`` per matrix, or over the whole batch with ``pinverse_original_init``.
    """
    identity = torch.eye(matrix.shape[-1], device=matrix.device, dtype=matrix.dtype)
    column_sums = matrix.sum(dim=-2)
    if pinverse_original_init:
        scale = 1.0 / column_sums.max()
    else:
        scale = 1.0 / column_sums.amax(dim=-1)[..., None, None]
    inverse = scale * matrix.transpose(-1, -2)
    for _ in range(n_iter):
        product = matrix @ inverse
        inverse = (0.25 * inverse) @ (13 * identity - product @ (15 * identity - product @ (7 * identity - product)))
    return inverse


def _upper_triangle_additive(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    drop = torch.ones(rows, cols, dtype=torch.bool, device=like.device).triu(diagonal=1)
    return torch.zeros(rows, cols, dtype=like.dtype, device=like.device).masked_fill(drop, float("-inf"))


def _softmax_scores(q: torch.Tensor, k: torch.Tensor, additive: torch.Tensor | None = None) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if additive is not None:
        scores = scores + additive
    return torch.softmax(scores, dim=-1)


@register_attention("nystrom", AttentionConfig)
class NystromAttention(Attention):
    """Args (xFormers' names and defaults):
        dropout: probability of dropping an output value at training time.
        num_heads: heads, needed to reshape ``V`` for the convolution skip.
        num_landmarks: ``m``.
        landmark_pooling: module ``(*batch, S, D) -> (*batch, m, D)``; segment means when None.
        causal: triangular masks on the kernels (see module docstring).
        use_razavi_pinverse: iterative pseudo-inverse (else ``torch.linalg.pinv``).
        pinverse_original_init: initialise the iteration with the batch-wide scale of the original code.
        inv_iterations: iterations of the pseudo-inverse.
        v_skip_connection: module on ``V`` reshaped ``(-1, num_heads, S, D_v)`` added to the output.
        conv_kernel_size: when given (and no ``v_skip_connection``), a depthwise ``(conv_kernel_size, 1)`` conv skip.
    """

    accepts_head_dimension = True
    requires_separate_masks = True
    supports_attention_mask = False
    supports_key_padding_mask = True
    requires_same_k_q_dimensions = True

    def __init__(
        self,
        dropout: float = 0.0,
        num_heads: int = 1,
        num_landmarks: int = 64,
        landmark_pooling: nn.Module | None = None,
        causal: bool = False,
        use_razavi_pinverse: bool = True,
        pinverse_original_init: bool = False,
        inv_iterations: int = 6,
        v_skip_connection: nn.Module | None = None,
        conv_kernel_size: int | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(dropout=dropout)
        if int(num_landmarks) < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if int(inv_iterations) < 0:
            raise ValueError(f"inv_iterations must be >= 0, got {inv_iterations}")
        if conv_kernel_size is not None and int(conv_kernel_size) < 1:
            raise ValueError(f"conv_kernel_size must be >= 1, got {conv_kernel_size}")
        self.num_heads = int(num_heads)
        self.num_landmarks = int(num_landmarks)
        self.causal = bool(causal)
        self.use_razavi_pinverse = bool(use_razavi_pinverse)
        self.pinverse_original_init = bool(pinverse_original_init)
        self.inv_iterations = int(inv_iterations)
        self.landmark_pooling = landmark_pooling if landmark_pooling is not None else AvgPool(self.num_landmarks)
        self.skip_connection = v_skip_connection
        if self.skip_connection is None and conv_kernel_size is not None:
            self.skip_connection = nn.Conv2d(
                self.num_heads, self.num_heads, kernel_size=(conv_kernel_size, 1),
                padding=(conv_kernel_size // 2, 0), bias=False, groups=self.num_heads,
            )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``key_padding_mask`` (the 4th positional argument, as on xFormers' page): bool (True keeps) or additive
        float (``-inf`` drops), shaped ``(batch, S)`` or ``(batch * heads, 1, S)`` (for 4-D inputs
        ``(batch, heads, S, D)`` also anything broadcasting to ``(batch, heads, 1, S)``).

        A mask whose dimensions do not fit is ignored, as the page documents, with a ``UserWarning`` that names the
        given and the expected shapes (xFormers ignores it silently; the other mechanisms raise ``ValueError``).
        NystromAttention takes no ``att_mask``: passing one by keyword raises ``ValueError``.
        """
        reject_ignored_masks(self, "key_padding_mask", args, kwargs)
        seq_len = k.shape[-2]
        if q.shape[-2] != seq_len:
            raise ValueError(f"NystromAttention is self-attention: {q.shape[-2]} queries but {seq_len} keys")
        try:
            keep = normalize_key_padding_mask(key_padding_mask, q, seq_len)  # (*batch, 1, S) or None
        except ValueError as err:
            warnings.warn(f"NystromAttention ignores this key_padding_mask: {err}", UserWarning, stacklevel=4)
            keep = None
        key_additive = None
        if keep is not None:
            # Padded positions are zeroed as queries and keys (they then pool into the landmarks as zeros).
            q = q * keep.transpose(-1, -2).to(q.dtype)
            k = k * keep.transpose(-1, -2).to(k.dtype)
            key_additive = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))

        if self.num_landmarks >= seq_len:
            additive = key_additive
            if self.causal:
                causal = _upper_triangle_additive(seq_len, seq_len, q)
                additive = causal if additive is None else additive + causal
            out = _softmax_scores(q, k, additive) @ v
        else:
            q_landmarks = self.landmark_pooling(q)
            k_landmarks = self.landmark_pooling(k)
            m = q_landmarks.shape[-2]
            mask_1 = mask_2 = mask_3 = None
            if self.causal:
                mask_1 = _upper_triangle_additive(seq_len, m, q)
                mask_2 = _upper_triangle_additive(m, m, q)
                mask_3 = _upper_triangle_additive(m, seq_len, q)
            if key_additive is not None:
                mask_3 = key_additive if mask_3 is None else mask_3 + key_additive
            kernel_1 = _softmax_scores(q, k_landmarks, mask_1)
            kernel_2 = _softmax_scores(q_landmarks, k_landmarks, mask_2)
            kernel_3 = _softmax_scores(q_landmarks, k, mask_3)
            # The (m, m) inverse is cheap and ill-conditioned: always computed in at least float32.
            kernel_2_wide = kernel_2.float() if kernel_2.dtype in (torch.float16, torch.bfloat16) else kernel_2
            if self.use_razavi_pinverse:
                kernel_2_inv = iterative_pinv(kernel_2_wide, self.inv_iterations, self.pinverse_original_init)
            else:
                kernel_2_inv = torch.linalg.pinv(kernel_2_wide)
            middle = (kernel_2_inv @ (kernel_3 @ v).to(kernel_2_inv.dtype)).to(v.dtype)  # (*batch, m, D_v)
            out = kernel_1 @ middle

        if self.skip_connection is not None:
            v_heads = v.reshape(-1, self.num_heads, v.shape[-2], v.shape[-1])
            out = out + self.skip_connection(v_heads).reshape(out.shape)
        return F.dropout(out, self.dropout, self.training) if self.dropout > 0 else out

    def extra_repr(self) -> str:
        return (f"num_landmarks={self.num_landmarks}, causal={self.causal}, "
                f"inv_iterations={self.inv_iterations}, use_razavi_pinverse={self.use_razavi_pinverse}")
