"""OrthoFormer attention (Patrick et al. 2021, "Keeping Your Eye on the Ball"): attention through ``m`` landmarks
picked among the queries.

Shapes: ``q: (*batch, S_q, D)``, ``k: (*batch, S_k, D)``, ``v: (*batch, S_k, D_v)`` -> ``(*batch, S_q, D_v)``.

    L = select(Q)   (m landmarks, chosen without gradient)
    out = softmax(Q L^T / sqrt(D)) · softmax(L K^T / sqrt(D) + key padding) V

Memory is linear in the sequence length. Landmark selection (``landmark_selection``):
    ``orthogonal``: greedily add the query least similar (|cosine|) to those already chosen;
    ``kmeans`` / ``kmeans_spherical``: cluster centres of the queries (6 Lloyd iterations);
    ``random``: half random queries, half random keys.
``subsample_fraction < 1`` picks landmarks from a random subset of the queries. With ``num_landmarks == S_k`` it is
exact softmax attention (and then takes an ``att_mask``).
"""

from __future__ import annotations

import enum
from typing import Any

import torch
import torch.nn.functional as F

from mmtrain.modules.attention.base import (
    Attention,
    AttentionConfig,
    AttentionConfigError,
    register_attention,
)
from mmtrain.modules.attention.core import AttentionMask, ScaledDotProduct, reject_ignored_masks
from mmtrain.modules.attention.pattern import normalize_key_padding_mask


class LandmarkSelection(str, enum.Enum):
    Orthogonal = "orthogonal"
    KMeans = "kmeans"
    KMeans_Spherical = "kmeans_spherical"
    Random = "random"


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-2], x.shape[-1])


@register_attention("orthoformer", AttentionConfig)
class OrthoFormerAttention(Attention):
    """Args:
        dropout: probability of dropping an output value at training time.
        num_landmarks: ``m``.
        subsample_fraction: fraction of the queries considered when selecting landmarks.
        landmark_selection: a ``LandmarkSelection`` or its string value.
    """

    accepts_head_dimension = True
    requires_same_k_q_dimensions = True
    supports_attention_mask = True
    supports_key_padding_mask = True

    def __init__(self, dropout: float = 0.0, num_landmarks: int = 32, subsample_fraction: float = 1.0,
                 landmark_selection: LandmarkSelection | str = LandmarkSelection.Orthogonal, *args: Any,
                 causal: bool = False, **kwargs: Any) -> None:
        super().__init__(dropout=dropout)
        if causal:
            raise ValueError("OrthoFormerAttention mixes all positions through its landmarks and cannot be causal "
                             "(causal=True given)")
        if int(num_landmarks) < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if not 0.0 < float(subsample_fraction) <= 1.0:
            raise ValueError(f"subsample_fraction must be in (0, 1], got {subsample_fraction}")
        try:
            self.landmark_selection = LandmarkSelection(landmark_selection)
        except ValueError:
            choices = ", ".join(s.value for s in LandmarkSelection)
            raise ValueError(f"landmark_selection {landmark_selection!r} is not one of: {choices}") from None
        self.num_landmarks = int(num_landmarks)
        self.subsample_fraction = float(subsample_fraction)
        self._exact = ScaledDotProduct(dropout=dropout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                att_mask: torch.Tensor | AttentionMask | None = None, *args: Any,
                key_padding_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        reject_ignored_masks(self, "att_mask", args, kwargs)
        s_k = k.shape[-2]
        if self.num_landmarks == s_k:
            self._exact.train(self.training)
            return self._exact(q, k, v, att_mask=att_mask, key_padding_mask=key_padding_mask)
        if self.num_landmarks > min(q.shape[-2], s_k) and self.landmark_selection != LandmarkSelection.Random:
            # A config mistake found only once the sequence length is known: a ConfigError (one line, exit 2),
            # still a ValueError for direct callers.
            tokens = min(q.shape[-2], s_k)
            raise AttentionConfigError(
                f"attention 'orthoformer': num_landmarks={self.num_landmarks} is more than the {tokens} tokens to "
                f"pick from; use num_landmarks <= {tokens} or landmark_selection=random"
            )
        if att_mask is not None:
            raise ValueError("OrthoFormerAttention cannot apply att_mask through landmarks "
                             f"(num_landmarks={self.num_landmarks} < {s_k} keys); pass a key_padding_mask instead")
        with torch.no_grad():
            landmarks = self.select_landmarks(q.detach(), k.detach())  # (*batch, m, D)
        keep = normalize_key_padding_mask(key_padding_mask, q, s_k)
        scale = q.shape[-1] ** -0.5
        kernel_1 = torch.softmax((q @ landmarks.transpose(-1, -2)) * scale, dim=-1)
        scores_2 = (landmarks @ k.transpose(-1, -2)) * scale
        if keep is not None:
            scores_2 = scores_2.masked_fill(~keep, float("-inf"))
        kernel_2 = torch.softmax(scores_2, dim=-1)
        out = kernel_1 @ (kernel_2 @ v)
        return F.dropout(out, self.dropout, self.training) if self.dropout > 0 else out

    # -- landmark selection: (*batch, S, D) -> (*batch, m, D), no gradient -------------------------------------
    def select_landmarks(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        lead = q.shape[:-2]
        if self.landmark_selection == LandmarkSelection.Random:
            half = self.num_landmarks // 2
            q_pick = torch.randint(q.shape[-2], (half,), device=q.device)
            k_pick = torch.randint(k.shape[-2], (self.num_landmarks - half,), device=k.device)
            return torch.cat((q[..., q_pick, :], k[..., k_pick, :]), dim=-2)
        samples = _flat(self._subsample(q))
        if self.landmark_selection == LandmarkSelection.Orthogonal:
            landmarks = self._orthogonal(samples)
        else:
            spherical = self.landmark_selection == LandmarkSelection.KMeans_Spherical
            landmarks = self._kmeans(samples, spherical)
        return landmarks.reshape(*lead, self.num_landmarks, q.shape[-1])

    def _subsample(self, q: torch.Tensor) -> torch.Tensor:
        if self.subsample_fraction >= 1.0:
            return q
        count = max(int(self.subsample_fraction * q.shape[-2]), self.num_landmarks)
        return q[..., torch.randperm(q.shape[-2], device=q.device)[:count], :]

    def _orthogonal(self, samples: torch.Tensor) -> torch.Tensor:
        batch, n, _ = samples.shape
        normalized = F.normalize(samples, p=2, dim=-1)
        rows = torch.arange(batch, device=samples.device)
        chosen = torch.zeros(batch, n, dtype=torch.bool, device=samples.device)
        index = torch.randint(n, (batch,), device=samples.device)
        indices = [index]
        chosen[rows, index] = True
        # Largest |cosine| of every candidate to the chosen set so far; the next landmark minimises it.
        max_similarity = torch.zeros(batch, n, dtype=samples.dtype, device=samples.device)
        for _ in range(1, self.num_landmarks):
            latest = normalized[rows, index]  # (batch, D)
            similarity = torch.einsum("bnd,bd->bn", normalized, latest).abs()
            max_similarity = torch.maximum(max_similarity, similarity)
            index = max_similarity.masked_fill(chosen, float("inf")).argmin(dim=-1)
            chosen[rows, index] = True
            indices.append(index)
        order = torch.stack(indices, dim=-1)  # (batch, m)
        return samples[rows[:, None], order]

    def _kmeans(self, samples: torch.Tensor, spherical: bool, num_iters: int = 6) -> torch.Tensor:
        batch, n, dim = samples.shape
        points = F.normalize(samples, p=2, dim=-1) if spherical else samples
        start = torch.randperm(n, device=samples.device)[: self.num_landmarks]
        centres = points[:, start, :].clone()
        for _ in range(num_iters):
            if spherical:
                assignment = (points @ centres.transpose(-1, -2)).argmax(dim=-1)
            else:
                distance = (points.pow(2).sum(-1, keepdim=True) - 2 * points @ centres.transpose(-1, -2)
                            + centres.pow(2).sum(-1)[:, None, :])
                assignment = distance.argmin(dim=-1)
            sums = torch.zeros_like(centres).scatter_add_(1, assignment[..., None].expand(-1, -1, dim), points)
            counts = torch.zeros(batch, self.num_landmarks, dtype=points.dtype, device=points.device)
            counts.scatter_add_(1, assignment, torch.ones_like(assignment, dtype=points.dtype))
            # An empty cluster keeps its previous centre.
            centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
            if spherical:
                centres = F.normalize(centres, p=2, dim=-1)
        return centres

    def extra_repr(self) -> str:
        return (f"num_landmarks={self.num_landmarks}, landmark_selection={self.landmark_selection.value}, "
                f"subsample_fraction={self.subsample_fraction}")
