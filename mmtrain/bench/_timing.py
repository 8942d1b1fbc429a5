"""Step timing shared by the benchmarks: warm-up, then per-step seconds.

CUDA: one pair of events around each step, recorded back to back with no host sync inside the timed loop (the
steps queue as they would in training), read after one final synchronize. CPU: ``perf_counter`` per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def time_steps(one_step: Callable[[], Any], *, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Run ``one_step`` ``warmup`` times untimed, then ``steps`` times timed; seconds per timed step."""
    for _ in range(warmup):
        one_step()
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - start)
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        one_step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1000 for start, end in events]
