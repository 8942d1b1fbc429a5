"""FlashAttention-4 (``flash_attn.cute``, the optional ``fa4`` extra) as a kernel for dense and local attention.

Shapes as mmtrain's attention modules: ``q: (*batch, S_q, D)``, ``k: (*batch, S_k, D)``, ``v: (*batch, S_k, D_v)``
-> ``(*batch, S_q, D_v)``, with ``*batch`` either ``batch * heads`` or ``(batch, heads)``. FA4 takes
``(batch, seq, heads, dim)``; the transposes are views.

FA4 is written in CuTe DSL and compiles each kernel on its first call (seconds), then reuses it. On Hopper it runs
the attention shapes mmtrain needs faster than torch's kernels: the 11B vision encoder's head dim of 80, which
torch's flash kernel handles slowly, and sliding windows, where it visits only the key blocks of the band. The import
is lazy and guarded: without the extra (or on a machine where it cannot load) every caller keeps torch's kernels.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mmtrain[fa4]' (flash-attn-4 with nvidia-cutlass-dsl[cu13]; Hopper or Blackwell GPUs)"

# Head dims FA4 runs as they are; others are zero-padded up to the next multiple (same scores, same output once
# sliced). On an H100 with flash-attn-4 4.0.0b40, head dim 80 went through the forward right but gave a wrong dQ in
# the backward (62% of entries off, up to 0.86); padded to 96 or 128 it matched float64 attention, as 64 did.
HEAD_DIM_MULTIPLE = 32

_module: ModuleType | None = None
_import_error: str | None = None
_probed = False
_suspended = False


def fa4_module() -> ModuleType | None:
    """``flash_attn.cute``, or None when it is not installed or fails to load (the reason: ``fa4_import_error()``)."""
    global _module, _import_error, _probed
    if not _probed:
        _probed = True
        try:
            import flash_attn.cute as module  # noqa: PLC0415 - optional, heavy: imported on first use only
        except Exception as err:  # noqa: BLE001 - a broken CUDA toolkit flavour raises RuntimeError, not ImportError
            _import_error = f"{type(err).__name__}: {err}"
        else:
            _module = module
    return _module


def fa4_import_error() -> str | None:
    fa4_module()
    return _import_error


@contextlib.contextmanager
def fa4_suspended() -> Iterator[None]:
    """Callers keep torch's kernels inside this context: FLOP counting sees aten's attention ops, not FA4's."""
    global _suspended
    previous, _suspended = _suspended, True
    try:
        yield
    finally:
        _suspended = previous


def _padded(head_dim: int) -> int:
    return -(-head_dim // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE


def fa4_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FA4 takes these tensors: CUDA sm90+, fp16/bf16, head dims multiples of 8 (<= 256 on Hopper, <= 128
    elsewhere, after padding), and the package loads."""
    if _suspended:
        return False
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype):
        return False
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    if k.shape[-1] != head_dim or head_dim % 8 or head_dim_v % 8:
        return False
    major, _ = torch.cuda.get_device_capability(q.device)
    limit = 256 if major == 9 else 128
    if major < 9 or _padded(head_dim) > limit or _padded(head_dim_v) > limit:
        return False
    return fa4_module() is not None


def _to_bshd(x: torch.Tensor) -> torch.Tensor:
    """``(*batch, S, D)`` -> ``(batch, S, heads, D)`` as a view (heads = 1 for a 3-D input)."""
    if x.ndim == 3:
        return x.unsqueeze(2)
    if x.ndim == 4:
        return x.transpose(1, 2)
    return x.reshape(-1, x.shape[-3], x.shape[-2], x.shape[-1]).transpose(1, 2)


@torch.compiler.disable  # a CuTe DSL kernel: TorchDynamo cannot trace it, so a compiled region calls it as is
def fa4_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention through FA4; differentiable.

    ``causal``: query ``i`` sees keys ``j <= i + S_k - S_q`` (aligned bottom-right). ``window=(left, right)``: query
    ``i`` sees keys with ``-left <= j - i - (S_k - S_q) <= right`` (FlashAttention's sliding window).
    """
    module = fa4_module()
    if module is None:
        raise RuntimeError(f"FlashAttention-4 is not available ({fa4_import_error()}); {INSTALL_HINT}")
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    kwargs: dict[str, Any] = {"softmax_scale": head_dim ** -0.5 if scale is None else scale, "causal": causal}
    if window is not None:
        kwargs["window_size"] = (int(window[0]), int(window[1]))
    if _padded(head_dim) != head_dim:  # zero columns add nothing to q k^T; the scale stays the unpadded one
        q, k = (F.pad(x, (0, _padded(head_dim) - head_dim)) for x in (q, k))
    v_padded = F.pad(v, (0, _padded(head_dim_v) - head_dim_v)) if _padded(head_dim_v) != head_dim_v else v
    result = module.flash_attn_func(_to_bshd(q), _to_bshd(k), _to_bshd(v_padded), **kwargs)
    out = result[0] if isinstance(result, tuple) else result
    out = out[..., :head_dim_v]
    # (batch, S_q, heads, D_v) -> the caller's (*batch, S_q, D_v)
    if q.ndim == 3:
        return out.squeeze(2)
    return out.transpose(1, 2).reshape(*q.shape[:-1], head_dim_v)
