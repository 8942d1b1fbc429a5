"""Shared output of the step benchmarks: the mmtrain-vs-peer ratio, the printed table and the JSON file."""

from __future__ import annotations

import json
import os
from typing import Any


def best_mmtrain(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest mmtrain variant (names starting with "mmtrain") among those that produced a figure."""
    measured = [r for r in results if "samples_per_s" in r and r["name"].startswith("mmtrain")]
    return max(measured, key=lambda r: r["samples_per_s"], default=None)


def ratio_to(results: list[dict[str, Any]], name: str) -> float | None:
    """samples/s of the best mmtrain variant over that of the variant called ``name``, if both were measured."""
    best = best_mmtrain(results)
    other = next((r for r in results if r["name"] == name and "samples_per_s" in r), None)
    if best is None or other is None:
        return None
    return best["samples_per_s"] / other["samples_per_s"]


def print_and_write(results: list[dict[str, Any]], report: dict[str, Any], out: str) -> None:
    """Print one row per variant (an error instead of figures where it failed) and write ``report`` as JSON."""
    print(f"{'variant':<20} {'samples/s':>10} {'step ms':>9} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:<20} {r['error']}")
            continue
        step_ms = f"{r['step_s'] * 1000:.1f}" if "step_s" in r else "-"
        peak = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        print(f"{r['name']:<20} {r['samples_per_s']:>10.1f} {step_ms:>9} {peak:>9}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
