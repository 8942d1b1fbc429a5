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

import logging
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mmtrain[fa4]' (flash-attn-4 with nvidia-cutlass-dsl[cu13]; Hopper or Blackwell GPUs)"

_module: ModuleType | None = None
_import_error: str | None = None
_probed = False


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


def fa4_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FA4 takes these tensors: CUDA sm90+, fp16/bf16, head dims multiples of 8 (<= 256 on Hopper, <= 128
    elsewhere), and the package loads."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype):
        return False
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    if k.shape[-1] != head_dim or head_dim % 8 or head_dim_v % 8:
        return False
    major, _ = torch.cuda.get_device_capability(q.device)
    limit = 256 if major == 9 else 128
    if major < 9 or head_dim > limit or head_dim_v > limit:
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
    kwargs: dict[str, Any] = {"softmax_scale": scale, "causal": causal}
    if window is not None:
        kwargs["window_size"] = (int(window[0]), int(window[1]))
    result = module.flash_attn_func(_to_bshd(q), _to_bshd(k), _to_bshd(v), **kwargs)
    out = result[0] if isinstance(result, tuple) else result
    # (batch, S_q, heads, D_v) -> the caller's (*batch, S_q, D_v)
    if q.ndim == 3:
        return out.squeeze(2)
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])
