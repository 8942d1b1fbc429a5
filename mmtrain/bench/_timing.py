"""What the step benchmarks share: their common command-line options, and step timing (warm-up, then seconds).

CUDA: one pair of events around each step, recorded back to back with no host sync inside the timed loop (the
steps queue as they would in training), read after one final synchronize. CPU: ``perf_counter`` per step.
"""

from __future__ import annotations

import argparse
import json
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


def step_bench_parser(name: str, doc: str | None, *, batch: int, smoke_help: str,
                      compile_help: str) -> argparse.ArgumentParser:
    """``mmtrain bench NAME``'s parser with the options every step benchmark has: --smoke, --out, --batch,
    --steps, --warmup, --no-compile. The benchmark adds its own."""
    p = argparse.ArgumentParser(prog=f"mmtrain bench {name}", description=(doc or "").splitlines()[0])
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--out", default=f"bench_results/{name}.json", help="JSON results file")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help=compile_help)
    return p


def measure_variant(name: str, measure: Callable[[], dict[str, Any]], **on_error: Any) -> dict[str, Any]:
    """``measure()``'s result, or ``{"name", "error", **on_error}`` when it raised: one variant failing (a compile
    error, out of memory) must not cost the others. Printed as one JSON line either way, as it lands, so a run cut
    off by a time limit still reports what it measured."""
    try:
        result = measure()
    except Exception as err:  # noqa: BLE001
        result = {"name": name, "error": f"{type(err).__name__}: {err}"[:2000], **on_error}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps({k: v for k, v in result.items() if k != "config"}), flush=True)
    return result
