"""The one precision every contrastive loss computes in, whatever autocast is doing around it.

    compute_dtype(*tensors) -> torch.float64 if any tensor is float64, else torch.float32
    no_autocast(device) -> context manager with autocast disabled for ``device``'s type

The losses' logits are differences of nearly equal numbers (log-sum-exp minus the positive logit, softplus(x) - x),
so a bf16 matmul from the caller's autocast, or a forward and a backward that run under different autocast states,
turns those differences into rounding noise. The matmuls are B x B, small next to the towers.
"""

from __future__ import annotations

import contextlib

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any given tensor is float64 (so gradcheck sees float64 all the way), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# Device types with an autocast mode. A fixed set, not torch.amp.is_autocast_available: torch 2.11's Dynamo cannot
# trace that builtin, and the graph break it caused cost the whole-step compiled CLIP step a fifth of its speed.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")


def no_autocast(device: torch.device | str):
    """Autocast off for ``device``'s type; a plain no-op where autocast does not exist (e.g. ``meta``)."""
    device_type = torch.device(device).type
    if device_type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
