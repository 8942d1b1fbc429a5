"""Multi-head attention around any registered mechanism (the role of xFormers' MultiHeadDispatch).

State-dict keys follow torchtune (``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``) so its checkpoints load.

Shapes:
    x: (b, s_x, embed_dim)            queries
    y: (b, s_y, embed_dim) or None    keys and values (cross-attention); None means self-attention on x, or, when
                                      a filled KV cache is attached, the cached keys and values
    mask: bool (b, s_x, s_kv) or (s_x, s_kv), True attends; or an additive float mask of the same shapes
    key_padding_mask: bool (b, s_kv), True keeps
    input_pos: (b, s_x) or (s_x,) positions of x, for positional embeddings and causal masking with a cache
    -> (b, s_x, embed_dim)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.errors import ConfigError
from mmtrain.modules.attention.base import Attention, build_attention
from mmtrain.modules.attention.core import AttentionMask, ScaledDotProduct


class KVCache(nn.Module):
    """Keys and values kept between decoding steps, in buffers of fixed size ``(b, num_kv_heads, max_seq_len, d)``.

    ``update`` appends at the current length and returns views of everything cached so far.
    """

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.size = 0

    def reset(self) -> None:
        self.size = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (b, num_kv_heads, s, d) -> cached (b, num_kv_heads, size + s, d)."""
        start, end = self.size, self.size + k.shape[2]
        if end > self.k_cache.shape[2]:
            raise ValueError(f"KV cache holds {self.k_cache.shape[2]} positions; {end} requested")
        self.k_cache[:, :, start:end] = k
        self.v_cache[:, :, start:end] = v
        self.size = end
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]

    def cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_cache[:, :, : self.size], self.v_cache[:, :, : self.size]


class MultiHeadAttention(nn.Module):
    """Projections, head split, grouped-query key/value heads, optional rotary embeddings and KV cache, and an
    attention mechanism from the registry (dense SDPA by default).

    Args:
        embed_dim: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention); defaults to ``num_heads``.
        head_dim: per-head width; defaults to ``embed_dim // num_heads``.
        q_proj, k_proj, v_proj, output_proj: projection modules; ``nn.Linear(bias=bias)`` when not given.
        pos_embeddings: module applied to q and k as ``pos(x, input_pos=...)`` on ``(b, s, h, d)`` (RoPE).
        q_norm, k_norm: optional per-head norms applied before positional embeddings.
        kv_cache: a ``KVCache`` for decoding, or None (see ``setup_cache``).
        max_seq_len: longest sequence (passed to mechanisms that need a fixed length, e.g. Linformer).
        is_causal: causal self-attention.
        attn_dropout: dropout on attention weights.
        attention: an ``Attention`` instance, a registry config (``{"name": "local", "window_size": 9}``), or None.
        bias: bias of the default projections.
        fused_qkv: self-attention projects q, k and v with one matmul on the three weights concatenated (the
            parameters and state-dict keys stay separate). Applies where the three projections are plain
            ``nn.Linear`` and no KV cache is attached; otherwise the projections run one by one. With no mask, no
            q/k norms or positional embeddings and as many key/value heads as query heads, a mechanism that takes
            the packed projection (``ScaledDotProduct`` on FlashAttention-4) reads q, k and v from it in place.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        q_proj: nn.Module | None = None,
        k_proj: nn.Module | None = None,
        v_proj: nn.Module | None = None,
        output_proj: nn.Module | None = None,
        pos_embeddings: nn.Module | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        kv_cache: KVCache | None = None,
        max_seq_len: int = 4096,
        is_causal: bool = False,
        attn_dropout: float = 0.0,
        attention: Attention | dict[str, Any] | None = None,
        bias: bool = False,
        fused_qkv: bool = False,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or embed_dim // num_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if embed_dim % num_heads != 0 and head_dim * num_heads != embed_dim and output_proj is None:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if attn_dropout < 0 or attn_dropout > 1:
            raise ValueError(f"attn_dropout ({attn_dropout}) must be between 0.0 and 1.0")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.is_causal = is_causal
        if attention is None:
            attention = ScaledDotProduct(dropout=attn_dropout, causal=is_causal)
        elif not isinstance(attention, Attention):
            attention = build_attention(
                attention,
                dropout=attn_dropout,
                causal=is_causal,
                num_heads=num_heads,
                dim_head=head_dim,
                dim_model=embed_dim,
                seq_len=max_seq_len,
            )
        if attention.requires_input_projection:
            self.q_proj = q_proj or nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
            self.k_proj = k_proj or nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)
            self.v_proj = v_proj or nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)
        else:
            name = type(attention).__name__
            if any(p is not None for p in (q_proj, k_proj, v_proj)):
                raise ValueError(f"{name} takes its inputs unprojected (requires_input_projection=False): "
                                 "q_proj, k_proj and v_proj cannot be given")
            if num_kv_heads != num_heads or num_heads * head_dim != embed_dim:
                raise ValueError(f"{name} takes its inputs unprojected (requires_input_projection=False): that needs "
                                 f"num_kv_heads == num_heads and num_heads * head_dim == embed_dim, got "
                                 f"{num_kv_heads}, {num_heads}, {num_heads} * {head_dim} vs {embed_dim}")
            self.q_proj, self.k_proj, self.v_proj = nn.Identity(), nn.Identity(), nn.Identity()
        self.output_proj = output_proj or nn.Linear(num_heads * head_dim, embed_dim, bias=bias)
        self.pos_embeddings = pos_embeddings
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.kv_cache = kv_cache
        self.fused_qkv = fused_qkv
        self.attention = attention  # registered after the projections: parameter order as before

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int | None = None) -> None:
        device = self.q_proj.weight.device if hasattr(self.q_proj, "weight") else None
        self.kv_cache = KVCache(batch_size, max_seq_len or self.max_seq_len, self.num_kv_heads, self.head_dim,
                                dtype, device)

    def reset_cache(self) -> None:
        if self.kv_cache is not None:
            self.kv_cache.reset()

    def _projects_fused(self, y: torch.Tensor | None) -> bool:
        projections = (self.q_proj, self.k_proj, self.v_proj)
        # Exactly nn.Linear: a LoRA or quantized subclass computes more than its weight, so it keeps its own call.
        return (self.fused_qkv and y is None and self.kv_cache is None
                and all(type(p) is nn.Linear for p in projections)
                and len({p.bias is None for p in projections}) == 1)

    def _fused_projection(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, s, embed_dim) -> (b, s, (num_heads + 2 * num_kv_heads) * head_dim) holding [q | k | v]."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections])
        bias = None if self.q_proj.bias is None else torch.cat([p.bias for p in projections])
        return F.linear(x, weight, bias)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | AttentionMask | None = None,
        key_padding_mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.attention.requires_skip_multi_head:
            return self._attend_whole(x, x if y is None else y, mask, key_padding_mask)
        b, s_x, _ = x.shape
        fused_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        if self._projects_fused(y):
            qkv = self._fused_projection(x)
            packed = getattr(self.attention, "packed_self_attention", None)
            if (packed is not None and mask is None and key_padding_mask is None and self.q_norm is None
                    and self.k_norm is None and self.pos_embeddings is None and self.num_kv_heads == self.num_heads):
                out = packed(qkv, self.num_heads)
                if out is not None:
                    return self.output_proj(out.reshape(b, s_x, self.num_heads * self.head_dim))
            q_flat, k_flat, v_flat = qkv.split(
                [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
                dim=-1)
            fused_kv = (k_flat, v_flat)
        else:
            q_flat = self.q_proj(x)
        q = q_flat.view(b, s_x, self.num_heads, self.head_dim)
        # torchtune's disable_kv_cache sets cache_enabled=False: attend without reading or growing the cache
        cache = self.kv_cache if getattr(self, "cache_enabled", True) else None
        use_cached_kv = y is None and cache is not None and cache.size > 0 and not self.is_causal
        if input_pos is None and cache is not None and self.is_causal:
            input_pos = torch.arange(cache.size, cache.size + s_x, device=x.device)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
        q = q.transpose(1, 2)

        if use_cached_kv:
            k, v = cache.cached()
        else:
            kv_in = x if y is None else y
            s_y = kv_in.shape[1]
            k_flat, v_flat = fused_kv if fused_kv is not None else (self.k_proj(kv_in), self.v_proj(kv_in))
            k = k_flat.view(b, s_y, self.num_kv_heads, self.head_dim)
            v = v_flat.view(b, s_y, self.num_kv_heads, self.head_dim)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.pos_embeddings is not None and y is None:
                k = self.pos_embeddings(k, input_pos=input_pos)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v)

        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k = k.unsqueeze(2).expand(-1, -1, groups, -1, -1).flatten(1, 2)
            v = v.unsqueeze(2).expand(-1, -1, groups, -1, -1).flatten(1, 2)

        if self.attention.requires_same_k_q_dimensions and q.shape[-2] != k.shape[-2]:
            raise ValueError(f"{type(self.attention).__name__} needs queries and keys of one length "
                             f"(requires_same_k_q_dimensions), got {q.shape[-2]} queries and {k.shape[-2]} keys")

        # Decoding with a cache gives s_x < s_kv: causal mechanisms align the band bottom-right, which is
        # exactly "each new token sees the cache and itself".
        attn_kwargs: dict[str, Any] = {}
        if isinstance(mask, AttentionMask):
            # Its values are (1 or b, s_x, s_kv) (a 2-D mask is stored with a leading 1): a batch dimension, which
            # must line up with b, not with the heads, so the tensor goes through the same unsqueeze as below.
            mask = mask.values
        if isinstance(mask, torch.Tensor) and mask.shape[-1] > k.shape[-2]:
            # Columns past the keys are padding: a mask made for a fixed cache length (the collator's
            # pad_max_images, or torchtune's decode masks over the whole cache) while the cache holds fewer.
            mask = mask[..., :k.shape[-2]]
        if isinstance(mask, torch.Tensor) and mask.ndim == 3:
            mask = mask.unsqueeze(1)  # (b, 1, s_x, s_kv): broadcast over heads
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, None, None, :]
            if self.attention.supports_key_padding_mask:
                attn_kwargs["key_padding_mask"] = kpm
            else:
                mask = _merge_kpm(mask, kpm)
        if mask is not None and not self.attention.supports_attention_mask:
            raise ValueError(f"{type(self.attention).__name__} does not take an attention mask")
        fold = not (self.attention.requires_head_dimension or self.attention.accepts_head_dimension)
        if fold:
            # xFormers' layout for a mechanism written for it: heads folded into the batch, (b * h, s, d), the
            # attention mask expanded to match and the key padding mask handed over as given, (b, s_kv).
            q, k, v = (t.reshape(b * self.num_heads, t.shape[-2], t.shape[-1]) for t in (q, k, v))
            if isinstance(mask, torch.Tensor) and mask.ndim == 4:
                mask = mask.expand(b, self.num_heads, -1, -1).reshape(b * self.num_heads, *mask.shape[-2:])
            if "key_padding_mask" in attn_kwargs:
                attn_kwargs["key_padding_mask"] = key_padding_mask
        if mask is not None:
            out = self.attention(q, k, v, att_mask=mask, **attn_kwargs)
        else:
            out = self.attention(q, k, v, **attn_kwargs)
        if fold:
            out = out.view(b, self.num_heads, s_x, out.shape[-1])
        out = out.transpose(1, 2).reshape(b, s_x, self.num_heads * self.head_dim)
        return self.output_proj(out)

    def _attend_whole(self, x: torch.Tensor, kv_in: torch.Tensor, mask: torch.Tensor | AttentionMask | None,
                      key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """A mechanism that owns the multi-head part (``requires_skip_multi_head``) gets the inputs and masks as
        given and its output is the result, as in xFormers' MultiHeadDispatch."""
        name = type(self.attention).__name__
        kwargs: dict[str, Any] = {}
        if mask is not None:
            if not self.attention.supports_attention_mask:
                raise ValueError(f"{name} does not take an attention mask")
            kwargs["att_mask"] = mask
        if key_padding_mask is not None:
            if not self.attention.supports_key_padding_mask:
                raise ValueError(f"{name} does not take a key padding mask")
            kwargs["key_padding_mask"] = key_padding_mask
        return self.attention(x, kv_in, kv_in, **kwargs)


def set_fused_qkv(model: nn.Module, enabled: bool = True, *, packable_only: bool = False) -> int:
    """Switch ``fused_qkv`` on (or off) in every ``MultiHeadAttention`` of ``model``; returns how many now have it as
    asked (all of them, unless ``packable_only`` leaves some off).

    ``packable_only``: switch it on only where the attention could read the packed projection in place (no q/k norms
    or positional embeddings, as many key/value heads as query heads), where the fused matmul has been measured to
    pay; the others keep separate projections."""
    count = 0
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            packable = (module.q_norm is None and module.k_norm is None and module.pos_embeddings is None
                        and module.num_kv_heads == module.num_heads)
            module.fused_qkv = enabled and (packable or not packable_only)
            count += module.fused_qkv == enabled
    return count


def apply_fused_qkv_setting(model: nn.Module, setting: bool | str, sdpa_backend: str) -> int:
    """The recipes' ``fused_qkv`` key: ``auto`` switches it on with ``sdpa_backend: fa4`` in the attention layers whose
    packed projection FA4 reads in place (an 11B-shaped vision encoder step on an H100: 1% faster), and leaves it off
    otherwise; ``true`` switches it on in every ``MultiHeadAttention``, ``false`` off. Returns how many it switched on."""
    if setting not in ("auto", True, False):
        raise ConfigError(f"fused_qkv: expected auto, true or false, got {setting!r}")
    enabled = sdpa_backend == "fa4" if setting == "auto" else bool(setting)
    set_fused_qkv(model, enabled, packable_only=setting == "auto")
    return sum(1 for m in model.modules() if isinstance(m, MultiHeadAttention) and m.fused_qkv)


def _merge_kpm(mask: torch.Tensor | AttentionMask | None, kpm: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return kpm
    if isinstance(mask, AttentionMask):
        mask = mask.values
    if mask.dtype == torch.bool:
        return mask & kpm
    return mask.masked_fill(~kpm, float("-inf"))
