"""FLOPs per step, the measured bf16 matmul peak of this GPU, and model FLOPs utilization (MFU).

MFU = (FLOPs of one optimizer step on this rank) / (step time in s) / (measured peak FLOP/s of one GPU).
FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over a real forward + backward, so they include
what the model actually runs (attention variant, loss), not a 6 * params * tokens estimate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

_PEAK_CACHE: dict[str, float] = {}


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` once under FlopCounterMode, with every ``torch.compile`` region run eagerly; returns
    (total FLOPs, fn's result).

    Eager on purpose: in torch 2.11 (fixed in later releases), Dynamo meeting a compiled region for the first time
    under a dispatch mode marks its code "skip" for good (pytorch/pytorch#190286), so counting the recipes' first
    step left their regional compile off for the whole run (seen on an H100: CLIP's step at eager speed). The
    ``force_eager`` stance keeps Dynamo out of this call, so the regions compile at the next one. FlashAttention-4
    is set aside for the call too (torch's attention counts its FLOPs; the math is the same).
    """
    from mmtrain.modules.attention.fa4 import fa4_suspended  # FA4's kernels are invisible to the counter

    counter = FlopCounterMode(display=False)
    with torch.compiler.set_stance("force_eager"), fa4_suspended(), counter:
        result = fn()
    return int(counter.get_total_flops()), result


def measure_peak_flops(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16,
                       size: int = 8192, iters: int = 20) -> float | None:
    """Best achieved FLOP/s of a square ``size`` matmul in ``dtype`` on ``device``; None off-GPU.

    Measured once per device and cached (about a second on an H100).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    key = f"{torch.cuda.get_device_name(device)}:{dtype}:{size}"
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    peak = 2 * size**3 / best
    _PEAK_CACHE[key] = peak
    del a, b
    return peak


def mfu(flops_per_step: float | None, seconds_per_step: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1] (None when FLOPs or peak are unknown)."""
    if not flops_per_step or not peak_flops or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak_flops
