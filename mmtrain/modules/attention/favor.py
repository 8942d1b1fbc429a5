"""FAVOR+ attention (Performers, Choromanski et al. 2020): softmax attention through positive random features.

Shapes: ``q: (*batch, S_q, D)``, ``k: (*batch, S_k, D)``, ``v: (*batch, S_k, D_v)`` -> ``(*batch, S_q, D_v)``.

With ``phi`` a feature map of ``feature_maps`` (``m = dim_features`` features):

    not causal: out_i = phi(q_i) . (sum_j phi(k_j) v_j^T)         / phi(q_i) . (sum_j phi(k_j))
    causal:     out_i = phi(q_i) . (sum_{j<=i} phi(k_j) v_j^T)    / phi(q_i) . (sum_{j<=i} phi(k_j))

The causal prefix sums run over chunks: a running ``(m, D_v)`` state between chunks and a small triangular product
inside each, so memory stays linear in length. float16 inputs are computed in float32 (exp overflows float16). A key padding
mask zeroes the padded keys' features. ``iter_before_redraw`` draws new features after that many training-mode
forward calls (never in eval mode, so evaluation is repeatable).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mmtrain.modules.attention.base import Attention, AttentionConfig, register_attention
from mmtrain.modules.attention.core import reject_ignored_masks
from mmtrain.modules.attention.feature_maps import FEATURE_MAPS, FeatureMapType
from mmtrain.modules.attention.pattern import normalize_key_padding_mask

_CAUSAL_CHUNK = 128


def default_dim_features(dim_head: int) -> int:
    """xFormers' default: ``D (1 + log2 D)``, rounded down to even."""
    features = math.ceil(dim_head * (1 + math.log2(dim_head)))
    return 2 * (features // 2)


def causal_linear_attention(q_features: torch.Tensor, k_features: torch.Tensor, v: torch.Tensor,
                            chunk: int = _CAUSAL_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix sums ``(sum_{j<=i} phi(q_i).phi(k_j) v_j, sum_{j<=i} phi(q_i).phi(k_j))`` for ``S_q == S_k``.

    ``q_features, k_features: (*batch, S, m)``, ``v: (*batch, S, D_v)`` -> ``(*batch, S, D_v)``, ``(*batch, S, 1)``.
    """
    seq_len = q_features.shape[-2]
    padded = math.ceil(seq_len / chunk) * chunk
    if padded != seq_len:
        pad = (0, 0, 0, padded - seq_len)
        q_features, k_features, v = F.pad(q_features, pad), F.pad(k_features, pad), F.pad(v, pad)
    lead = q_features.shape[:-2]
    n = padded // chunk
    qc = q_features.reshape(*lead, n, chunk, q_features.shape[-1])
    kc = k_features.reshape(*lead, n, chunk, k_features.shape[-1])
    vc = v.reshape(*lead, n, chunk, v.shape[-1])
    # State before each chunk: exclusive prefix sum of the per-chunk sums (*batch, n, m, D_v) and (*batch, n, m).
    chunk_kv = kc.transpose(-1, -2) @ vc
    state_kv = chunk_kv.cumsum(dim=-3) - chunk_kv
    chunk_k = kc.sum(dim=-2)
    state_k = chunk_k.cumsum(dim=-2) - chunk_k
    within = (qc @ kc.transpose(-1, -2)).tril()  # (*batch, n, chunk, chunk)
    numerator = qc @ state_kv + within @ vc
    denominator = (qc @ state_k.unsqueeze(-1)) + within.sum(dim=-1, keepdim=True)
    numerator = numerator.reshape(*lead, padded, v.shape[-1])[..., :seq_len, :]
    denominator = denominator.reshape(*lead, padded, 1)[..., :seq_len, :]
    return numerator, denominator


@register_attention("favor", AttentionConfig)
class FavorAttention(Attention):
    """Args (xFormers' names and defaults):
        causal: prefix-sum (autoregressive) attention.
        dropout: probability of dropping an output value at training time.
        dim_features: number of random features ``m``; ``D (1 + log2 D)`` (even) from ``dim_head`` when None.
        dim_head: per-head width ``D``; needed when ``dim_features`` is None (the wrapper passes it).
        iter_before_redraw: redraw the features after this many training forward calls (None: never).
        feature_map_type: ``sm_orf``, ``sm_hyp`` or ``sm_reg`` (a ``FeatureMapType`` or its value).
        normalize_inputs: subtract the per-sequence largest squared norm inside ``exp`` for range safety.
    """

    accepts_head_dimension = True
    supports_attention_mask = False
    supports_key_padding_mask = True

    def __init__(
        self,
        causal: bool = False,
        dropout: float = 0.0,
        dim_features: int | None = None,
        dim_head: int | None = None,
        iter_before_redraw: int | None = None,
        feature_map_type: FeatureMapType | str = FeatureMapType.SMReg,
        normalize_inputs: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(dropout=dropout)
        if dim_features is None:
            if dim_head is None:
                raise ValueError("FavorAttention needs dim_features or dim_head to size its random features")
            dim_features = default_dim_features(int(dim_head))
        if int(dim_features) < 2:
            raise ValueError(f"dim_features must be >= 2, got {dim_features}")
        if iter_before_redraw is not None and int(iter_before_redraw) < 1:
            raise ValueError(f"iter_before_redraw must be >= 1 or None, got {iter_before_redraw}")
        try:
            self.feature_map_type = FeatureMapType(feature_map_type)
        except ValueError:
            choices = ", ".join(t.value for t in FeatureMapType)
            raise ValueError(f"feature_map_type {feature_map_type!r} is not one of: {choices}") from None
        self.causal = bool(causal)
        self.dim_features = int(dim_features)
        self.iter_before_redraw = None if iter_before_redraw is None else int(iter_before_redraw)
        self.normalize_inputs = bool(normalize_inputs)
        # The map redraws on FavorAttention's schedule (training calls only), not on its own call count.
        self.feature_map = FEATURE_MAPS[self.feature_map_type](
            self.dim_features, normalize_inputs=self.normalize_inputs,
            dim_input=None if dim_head is None else int(dim_head),
        )
        self._calls_since_redraw = 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, att_mask: torch.Tensor | None = None,
                *args: Any, key_padding_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """``att_mask`` is named only so that a mask passed 4th (where the other mechanisms take it) raises instead
        of landing in ``*args`` unseen: FavorAttention takes a ``key_padding_mask`` (by keyword) and no attention mask.
        """
        reject_ignored_masks(self, "att_mask", args, kwargs, att_mask=att_mask)
        if self.training and self.iter_before_redraw is not None:
            if self._calls_since_redraw >= self.iter_before_redraw:
                self.feature_map.redraw(q.shape[-1], q.device)
                self._calls_since_redraw = 0
            self._calls_since_redraw += 1
        out_dtype = v.dtype
        # float16 would overflow in exp; bfloat16 has float32's range and is kept (as xFormers does) for speed and
        # memory: the sums over keys accumulate in float32 inside the matmuls.
        compute_dtype = torch.float32 if q.dtype == torch.float16 else q.dtype
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q_features = self.feature_map(q)
            k_features = self.feature_map(k)
            keep = normalize_key_padding_mask(key_padding_mask, q, k.shape[-2])
            if keep is not None:
                k_features = k_features * keep.transpose(-1, -2).to(compute_dtype)
            if not self.causal:
                numerator = q_features @ (k_features.transpose(-1, -2) @ v)
                denominator = q_features @ k_features.sum(dim=-2).unsqueeze(-1)
            else:
                s_q, s_k = q.shape[-2], k.shape[-2]
                if s_q > s_k:
                    raise ValueError(f"causal FavorAttention needs S_q <= S_k, got {s_q} queries and {s_k} keys")
                if s_q < s_k:
                    # Queries are the last S_q positions (decoding after a KV cache): pad them in front.
                    q_features = F.pad(q_features, (0, 0, s_k - s_q, 0))
                numerator, denominator = causal_linear_attention(q_features, k_features, v)
                numerator, denominator = numerator[..., s_k - s_q:, :], denominator[..., s_k - s_q:, :]
            out = numerator / denominator
        out = F.dropout(out, self.dropout, self.training) if self.dropout > 0 else out
        return out.to(out_dtype)

    def extra_repr(self) -> str:
        return (f"dim_features={self.dim_features}, feature_map_type={self.feature_map_type.value}, "
                f"causal={self.causal}, iter_before_redraw={self.iter_before_redraw}")
