"""Nystrom attention (Nystromformer, Xiong et al. 2021): softmax attention through ``m`` landmarks.

Shapes: ``q, k: (*batch, S, D)``, ``v: (*batch, S, D_v)`` -> ``(*batch, S, D_v)`` (self-attention: one length).

With landmarks ``Q~ = pool(Q)``, ``K~ = pool(K)`` (``m`` segment means unless ``landmark_pooling`` is given):

    out = softmax(Q K~^T / sqrt(D)) · pinv(softmax(Q~ K~^T / sqrt(D))) · softmax(Q~ K^T / sqrt(D) + mask) V

``pinv`` is the iterative (Razavi et al.) Newton-Schulz pseudo-inverse with ``inv_iterations`` steps unless
``use_razavi_pinverse=False`` (then ``torch.linalg.pinv``). Memory is linear in ``S``. With ``num_landmarks >= S``
it is exact softmax attention (as in xFormers). ``conv_kernel_size`` adds the depthwise convolution skip over ``V``
(per head, along the sequence); ``v_skip_connection`` replaces it with any module on ``(batch, heads, S, D_v)``.
Under ``causal`` (and ``S > m``) no position sees a later token: a query attends exactly to its own segment up to
itself, and through the landmarks of the earlier, complete segments only (see ``_causal_landmark_attention``); the
convolution skip looks back only. xFormers builds triangular masks that compare landmark and token indices and
never applies them, so its causal Nystrom lets earlier positions see later tokens; that is not copied. The exact
own-segment part holds ``(S / m)``-wide score blocks, so causal memory grows as ``S * S / m``.

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
        causal: no position attends to a later one (see module docstring); needs the default landmarks.
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
        if self.causal and landmark_pooling is not None:
            raise ValueError("causal NystromAttention needs its own segment-mean landmarks (it must know which tokens "
                             "each landmark summarizes); landmark_pooling cannot be given with causal=True")
        self.landmark_pooling = landmark_pooling if landmark_pooling is not None else AvgPool(self.num_landmarks)
        self.skip_connection = v_skip_connection
        self._causal_conv_pad = 0
        if self.skip_connection is None and conv_kernel_size is not None:
            # Under causal the convolution looks back only: padded on the left in forward, not centred.
            self._causal_conv_pad = int(conv_kernel_size) - 1 if self.causal else 0
            self.skip_connection = nn.Conv2d(
                self.num_heads, self.num_heads, kernel_size=(conv_kernel_size, 1),
                padding=(0 if self.causal else conv_kernel_size // 2, 0), bias=False, groups=self.num_heads,
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
        elif self.causal:
            out = self._causal_landmark_attention(q, k, v, keep)
        else:
            q_landmarks = self.landmark_pooling(q)
            k_landmarks = self.landmark_pooling(k)
            kernel_1 = _softmax_scores(q, k_landmarks)
            kernel_2 = _softmax_scores(q_landmarks, k_landmarks)
            kernel_3 = _softmax_scores(q_landmarks, k, key_additive)
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
            if self._causal_conv_pad:
                v_heads = F.pad(v_heads, (0, 0, self._causal_conv_pad, 0))
            out = out + self.skip_connection(v_heads).reshape(out.shape)
        return F.dropout(out, self.dropout, self.training) if self.dropout > 0 else out

    def _causal_landmark_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   keep: torch.Tensor | None) -> torch.Tensor:
        """Causal Nystrom without looking ahead. Query ``i`` in segment ``s`` attends

        - exactly to the keys ``j <= i`` of its own segment, and
        - through the Nystrom factorization to the earlier segments ``0 .. s-1`` only: it sees the landmarks of
          complete segments, a landmark sees landmarks up to itself and keys up to its segment's end, and the
          (lower-triangular) landmark matrix is inverted exactly by a triangular solve, which keeps that order
          (the iterative pseudo-inverse would mix later landmarks into earlier ones).

        The two parts are combined by their softmax masses: exact for the own segment, ``sum_j n_j exp(q . k~_j)``
        over the earlier segments' landmarks (``n_j`` tokens each). With one token per segment it is exact.
        """
        seq_len, dim = k.shape[-2], q.shape[-1]
        m = self.num_landmarks
        scale = dim ** -0.5
        device = q.device
        short, length = m - seq_len % m, seq_len // m  # AvgPool's layout: `short` segments of `length`, then +1
        lengths = torch.full((m,), length, device=device, dtype=torch.long)
        lengths[short:] += 1
        ends = lengths.cumsum(0) - 1  # (m,) last token of each segment
        starts = ends - lengths + 1
        segment_of = torch.repeat_interleave(torch.arange(m, device=device), lengths, output_size=seq_len)  # (S,)
        width = length + (1 if short < m else 0)

        q_landmarks, k_landmarks = self.landmark_pooling(q), self.landmark_pooling(k)
        never = torch.finfo(q.dtype).min
        wide = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        arange_m = torch.arange(m, device=device)
        if keep is None:
            counts = lengths.to(q.dtype)  # (m,) tokens per segment
        else:  # (*batch, 1, m) kept tokens per segment: a wholly padded segment holds no mass and is left out
            counts = keep.to(q.dtype) @ (segment_of[:, None] == arange_m).to(q.dtype)
        has_tokens = counts > 0
        # Earlier segments through the landmarks.
        sees_landmark = (arange_m[None, :] < segment_of[:, None]) & has_tokens  # (*, S, m)
        scores_1 = (q @ k_landmarks.transpose(-1, -2)) * scale
        kernel_1 = scores_1.masked_fill(~sees_landmark, never).softmax(dim=-1)
        own_or_earlier = torch.ones(m, m, dtype=torch.bool, device=device).tril()
        diagonal = torch.eye(m, dtype=torch.bool, device=device)
        sees_earlier_landmark = (own_or_earlier & has_tokens) | diagonal  # (*, m, m); columns: landmarks seen
        scores_2 = (q_landmarks.to(wide) @ k_landmarks.to(wide).transpose(-1, -2)) * scale
        kernel_2 = scores_2.masked_fill(~sees_earlier_landmark, torch.finfo(wide).min).softmax(-1)  # lower triangular
        sees_key = torch.arange(seq_len, device=device)[None, :] <= ends[:, None]  # (m, S)
        if keep is not None:  # a padded segment's landmark keeps its causal range: finite, and never read
            sees_key = sees_key & (keep | ~has_tokens.transpose(-1, -2))
        kernel_3 = ((q_landmarks @ k.transpose(-1, -2)) * scale).masked_fill(~sees_key, never).softmax(dim=-1)
        middle = torch.linalg.solve_triangular(kernel_2, (kernel_3 @ v).to(wide), upper=False)
        earlier = kernel_1 @ middle.to(v.dtype)  # (*batch, S, D_v), normalized over the earlier segments
        log_mass_earlier = (scores_1 + counts.clamp(min=1).log()).masked_fill(~sees_landmark, never).logsumexp(-1)

        # The own segment, exactly: segments laid out as (m, width) blocks of token indices.
        offsets = torch.arange(width, device=device)
        index = starts[:, None] + offsets[None, :]  # (m, width)
        valid = offsets[None, :] < lengths[:, None]
        index = index.clamp(max=seq_len - 1)
        blocks = [t[..., index.reshape(-1), :].unflatten(-2, (m, width)) for t in (q, k, v)]
        scores_own = (blocks[0] @ blocks[1].transpose(-1, -2)) * scale  # (*batch, m, width, width)
        sees_own = valid[:, None, :] & (offsets[None, :, None] >= offsets[None, None, :])
        if keep is not None:
            sees_own = sees_own & keep[..., 0, index.reshape(-1)].unflatten(-1, (m, width))[..., None, :]
        scores_own = scores_own.masked_fill(~sees_own, never)
        log_mass_own = scores_own.logsumexp(dim=-1)  # (*batch, m, width)
        own = scores_own.softmax(dim=-1) @ blocks[2]
        position = (segment_of * width + torch.arange(seq_len, device=device) - starts[segment_of])  # (S,)
        own = own.flatten(-3, -2)[..., position, :]
        log_mass_own = log_mass_own.flatten(-2)[..., position]
        has_own = sees_own.any(dim=-1).flatten(-2)[..., position]  # (*, S): False only for padded queries

        # A part with nothing to attend to (no earlier segment, or a padded query) counts for nothing; a query
        # with neither gives 0, as fully masked rows do in the other mechanisms.
        has_earlier = sees_landmark.any(dim=-1)
        weight = torch.sigmoid(log_mass_earlier - log_mass_own)
        weight = torch.where(has_own, torch.where(has_earlier, weight, 0.0), has_earlier.to(weight.dtype))[..., None]
        earlier = earlier.masked_fill(~has_earlier[..., None], 0.0)
        own = own.masked_fill(~has_own[..., None], 0.0)
        return weight * earlier + (1 - weight) * own

    def extra_repr(self) -> str:
        return (f"num_landmarks={self.num_landmarks}, causal={self.causal}, "
                f"inv_iterations={self.inv_iterations}, use_razavi_pinverse={self.use_razavi_pinverse}")
