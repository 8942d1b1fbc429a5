"""Pre-norm transformer layers (self- and cross-attention), the gated feed-forward block, norms and gates.

torchtune's names, arguments and state-dict keys (``attn``, ``mlp.w1/w2/w3``, ``sa_norm``, ``mlp_norm``,
``ca_norm``, ``sa_scale``, ``mlp_scale``, ``ca_scale``, ``RMSNorm.scale``, ``TanhGate.scale``), so torchtune
checkpoints load unchanged.

Shapes:
    x: (b, s, d)                         token stream
    mask: bool (b, s, s) or (s, s)       self-attention mask, True attends (None: the attention's own default)
    encoder_input: (b, s_e, d_e)         what cross-attention attends to (e.g. image tokens)
    encoder_mask: bool (b, s, s_e)       True where text token i may attend to encoder token j
    input_pos: (b, s) or (s,)            positions, for rotary embeddings and KV caches
    -> (b, s, d)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.modules.attention import MultiHeadAttention

__all__ = [
    "FeedForward",
    "Fp32LayerNorm",
    "RMSNorm",
    "TanhGate",
    "TransformerCrossAttentionLayer",
    "TransformerSelfAttentionLayer",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32: ``x / sqrt(mean(x^2) + eps) * scale``. Shape-preserving."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.normalized_shape = (dim,)
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        x_normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x_normed * self.scale.float()).type_as(x)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 or wider (stable under bf16), output cast back to the input dtype."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype in (torch.bfloat16, torch.float16) and (self.weight is None or self.weight.dtype == input.dtype):
            # The layer_norm kernels accumulate half inputs in float32 and the half weights are exact in float32,
            # so this is the same computation without materialising (and saving for backward) float32 copies.
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        # At least float32 (float64 inputs stay float64, so float64 references can check it exactly).
        dtype = torch.promote_types(input.dtype, torch.float32)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        out = F.layer_norm(input.to(dtype), self.normalized_shape, weight, bias, self.eps)
        return out.type_as(input)


class TanhGate(nn.Module):
    """``x * tanh(scale)`` with a learnable scalar ``scale`` initialised to 0 (the gate starts closed)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.tanh()


class FeedForward(nn.Module):
    """``w2(activation(w1(x)) * w3(x))`` (gated, SwiGLU with SiLU) or ``w2(activation(w1(x)))`` without ``up_proj``.

    Args:
        gate_proj: first projection, stored as ``w1``.
        down_proj: output projection, stored as ``w2``.
        up_proj: optional gating projection, stored as ``w3``.
        activation: non-linearity applied to ``w1(x)``.

    Shapes: (..., d) -> (..., d_out of down_proj).
    """

    def __init__(
        self,
        *,
        gate_proj: nn.Module,
        down_proj: nn.Module,
        up_proj: nn.Module | None = None,
        activation: nn.Module = nn.SiLU(),
    ) -> None:
        super().__init__()
        self.w1 = gate_proj
        self.w2 = down_proj
        self.w3 = up_proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)


def _cache_enabled(attn: nn.Module) -> bool:
    """A cache is set up and not switched off (``cache_enabled``: torchtune's disable_kv_cache)."""
    return getattr(attn, "kv_cache", None) is not None and bool(getattr(attn, "cache_enabled", True))


class TransformerSelfAttentionLayer(nn.Module):
    """Pre-norm self-attention block: ``h = x + sa_scale(attn(sa_norm(x)))``; ``out = h + mlp_scale(mlp(mlp_norm(h)))``.

    Args:
        attn: a ``MultiHeadAttention`` (any mechanism from the attention registry).
        mlp: feed-forward module.
        sa_norm, mlp_norm: norms before attention / feed-forward (identity when None).
        sa_scale, mlp_scale: modules scaling the branch outputs, e.g. ``TanhGate`` (identity when None).
        mask_mod: optional ``mask_mod(mask=..., bsz=..., seq_len=...) -> mask`` applied before attention.

    Shapes: x (b, s, d) -> (b, s, d).
    """

    def __init__(
        self,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        *,
        sa_norm: nn.Module | None = None,
        mlp_norm: nn.Module | None = None,
        sa_scale: nn.Module | None = None,
        mlp_scale: nn.Module | None = None,
        mask_mod: Any = None,
    ) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.sa_norm = sa_norm or nn.Identity()
        self.mlp_norm = mlp_norm or nn.Identity()
        self.sa_scale = sa_scale or nn.Identity()
        self.mlp_scale = mlp_scale or nn.Identity()
        self.mask_mod = mask_mod

    def setup_caches(self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int,
                     decoder_max_seq_len: int) -> None:
        """KV cache of ``decoder_max_seq_len`` positions (``encoder_max_seq_len`` is ignored here)."""
        self.attn.setup_cache(batch_size, dtype, max_seq_len=decoder_max_seq_len)

    def caches_are_setup(self) -> bool:
        return getattr(self.attn, "kv_cache", None) is not None

    def caches_are_enabled(self) -> bool:
        return _cache_enabled(self.attn)

    def reset_cache(self) -> None:
        self.attn.reset_cache()

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """x: (b, s, d); mask: bool (b, s, s) True attends; input_pos: (b, s). Extra kwargs (encoder_input,
        encoder_mask) are accepted and ignored so that mixed layer stacks take one set of arguments."""
        h = self.sa_norm(x)
        if self.mask_mod is not None:
            bsz, seq_len, *_ = h.shape
            mask = self.mask_mod(mask=mask, bsz=bsz, seq_len=seq_len)
        # y=None: self-attention (keys get the same positional embeddings as queries; KV cache appends).
        attn_out = self.attn(h, mask=mask, input_pos=input_pos)
        h = self.sa_scale(attn_out) + x
        mlp_out = self.mlp(self.mlp_norm(h))
        return h + self.mlp_scale(mlp_out)


class TransformerCrossAttentionLayer(nn.Module):
    """Pre-norm cross-attention block: queries from ``x``, keys/values from ``encoder_input``.

    ``h = x + ca_scale(attn(ca_norm(x), encoder_input))``; ``out = h + mlp_scale(mlp(mlp_norm(h)))``.
    Rows of ``encoder_mask`` that are fully masked (a text token that sees no image) skip the layer: their
    attention and feed-forward outputs are zeroed, so the token passes through unchanged (no NaN from an empty
    softmax). With no ``encoder_input`` and no filled cache the layer is the identity.

    Args:
        attn: a ``MultiHeadAttention`` without positional embeddings.
        mlp: feed-forward module.
        ca_norm, mlp_norm: norms before cross-attention / feed-forward (identity when None).
        ca_scale, mlp_scale: branch scales, e.g. ``TanhGate`` (identity when None).

    Raises:
        AssertionError: if ``attn.pos_embeddings`` is set (q and k come from different sequences).

    Shapes: x (b, s, d), encoder_input (b, s_e, d_e), encoder_mask bool (b, s, s_e) -> (b, s, d).
    """

    def __init__(
        self,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        *,
        ca_norm: nn.Module | None = None,
        mlp_norm: nn.Module | None = None,
        ca_scale: nn.Module | None = None,
        mlp_scale: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if getattr(attn, "pos_embeddings", None) is not None:
            raise AssertionError(
                "Doesn't support positional embeddings for cross attention, because q and k are different sequences."
            )
        self.attn = attn
        self.mlp = mlp
        self.ca_norm = ca_norm or nn.Identity()
        self.mlp_norm = mlp_norm or nn.Identity()
        self.ca_scale = ca_scale or nn.Identity()
        self.mlp_scale = mlp_scale or nn.Identity()

    def setup_caches(self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int,
                     decoder_max_seq_len: int) -> None:
        """KV cache of ``encoder_max_seq_len`` positions (``decoder_max_seq_len`` is ignored here)."""
        self.attn.setup_cache(batch_size, dtype, max_seq_len=encoder_max_seq_len)

    def caches_are_setup(self) -> bool:
        return getattr(self.attn, "kv_cache", None) is not None

    def caches_are_enabled(self) -> bool:
        return _cache_enabled(self.attn)

    def reset_cache(self) -> None:
        self.attn.reset_cache()

    @staticmethod
    def _skip_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
        """(b, s, s_e) mask -> (b, s, 1), True for rows where no encoder position is attended."""
        if mask is None:
            return None
        dropped = ~mask if mask.dtype == torch.bool else torch.isneginf(mask)
        return dropped.all(dim=-1, keepdim=True)

    def forward(
        self,
        x: torch.Tensor,
        *,
        encoder_input: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """x: (b, s, d); encoder_input: (b, s_e, d_e) or None (cached); encoder_mask: bool (b, s, s_e)."""
        cache = getattr(self.attn, "kv_cache", None)
        empty_cache = not self.caches_are_enabled() or cache is None or cache.size == 0
        if encoder_input is None and empty_cache:
            return x

        skip_mask = self._skip_mask(encoder_mask)
        if encoder_mask is not None:
            # Unmask the skipped rows so softmax (and its backward) sees no empty row; the rows' outputs are
            # zeroed below, so this changes nothing else.
            if encoder_mask.dtype == torch.bool:
                encoder_mask = encoder_mask | skip_mask
            else:
                encoder_mask = encoder_mask.masked_fill(skip_mask, 0.0)

        attn_out = self.attn(self.ca_norm(x), encoder_input, mask=encoder_mask)
        if skip_mask is not None:
            attn_out = attn_out.masked_fill(skip_mask, 0)
        h = self.ca_scale(attn_out) + x

        mlp_out = self.mlp(self.mlp_norm(h))
        if skip_mask is not None:
            mlp_out = mlp_out.masked_fill(skip_mask, 0)
        return h + self.mlp_scale(mlp_out)
