"""Random attention (BigBird): each query attends to a random subset of the keys, a fraction ``r`` of them.

Shapes: ``q: (*batch, S_q, D)``, ``k: (*batch, S_k, D)``, ``v: (*batch, S_k, D_v)`` -> ``(*batch, S_q, D_v)``.

The random pattern is a hash of ``(seed, i, j)`` compared with ``r``, so it is never stored: FlexAttention evaluates
it per block on CUDA, the masked path per chunk elsewhere. Each query also keeps its own position (``i == j``), so
no row is empty. ``constant_masking`` keeps one seed for the life of the module (drawn from torch's RNG at
construction, so seeded runs repeat); otherwise every forward call draws a new pattern. ``causal`` additionally
drops keys after the query.
"""

from __future__ import annotations

from typing import Any

import torch

from mmtrain.modules.attention.base import AttentionConfig, register_attention
from mmtrain.modules.attention.pattern import KeepFn, PatternAttention

_MASK32 = 0xFFFFFFFF


_HASH_MULTIPLIERS = (0x7FEB352D, 0x68E31DA5, 0x45D9F3B)


def hash_uniform32(seed: int | torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor,
                   multipliers: torch.Tensor | None = None) -> torch.Tensor:
    """A well-mixed 32-bit integer per ``(seed, q_idx, kv_idx)`` (int64 tensor holding values below 2**32).

    Plain integer arithmetic (products stay below 2**63), so it gives the same bits on CPU and in Triton kernels.
    Inside FlexAttention the multipliers must come in as a tensor (``multipliers``, int64 ``(3,)``): as Python
    literals Inductor folds them into int32 index expressions and the block-mask kernel fails to compile.
    """
    if multipliers is None:
        m_q, m_k, m_mix = _HASH_MULTIPLIERS
    else:
        m_q, m_k, m_mix = multipliers[0], multipliers[1], multipliers[2]
    x = (q_idx.to(torch.int64) * m_q + kv_idx.to(torch.int64) * m_k + seed) & _MASK32
    x = ((x >> 16) ^ x) * m_mix & _MASK32
    x = ((x >> 16) ^ x) * m_mix & _MASK32
    return (x >> 16) ^ x


@register_attention("random", AttentionConfig)
class RandomAttention(PatternAttention):
    """Args:
        dropout: probability of dropping an attention weight at training time.
        causal: a query never attends to later keys.
        r: fraction of the keys each query attends to (in ``[0, 1]``).
        constant_masking: keep one random pattern across calls (else redraw every call).
        force_sparsity: accepted for xFormers compatibility; the pattern is always computed sparsely.
    """

    def __init__(
        self,
        dropout: float = 0.0,
        causal: bool = False,
        r: float = 0.01,
        constant_masking: bool = True,
        force_sparsity: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(dropout=dropout, causal=causal, force_sparsity=force_sparsity)
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"r must be a fraction in [0, 1], got {r!r}")
        self.r = float(r)
        self.constant_masking = bool(constant_masking)
        self.seed = self._draw_seed()

    @staticmethod
    def _draw_seed() -> int:
        # Drawn on the CPU (torch's global generator) even under a meta default device, as `mmtrain validate` builds.
        return int(torch.randint(0, 2**31 - 1, (1,), device="cpu").item())

    def make_keep(self, s_q: int, s_k: int, device: torch.device) -> KeepFn:
        if not self.constant_masking:
            self.seed = self._draw_seed()
        offset, causal = self.query_offset(s_q, s_k), self.causal
        # A changing seed travels as a tensor so compiled FlexAttention does not recompile for every new draw.
        seed: int | torch.Tensor = self.seed if self.constant_masking else torch.tensor(self.seed, device=device)
        threshold = round(self.r * 2**32)
        multipliers = torch.tensor(_HASH_MULTIPLIERS, dtype=torch.int64, device=device)

        def keep(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            position = q_idx + offset
            kept = (hash_uniform32(seed, position, kv_idx, multipliers) < threshold) | (position == kv_idx)
            if causal:
                kept = kept & (kv_idx <= position)
            return kept

        return keep

    def cache_key(self, s_q: int, s_k: int) -> tuple[Any, ...] | None:
        return (s_q, s_k, self.seed)

    def extra_repr(self) -> str:
        return f"r={self.r}, causal={self.causal}, constant_masking={self.constant_masking}"
