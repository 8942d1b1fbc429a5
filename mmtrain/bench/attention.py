"""``mmtrain bench attention``: forward + backward time and peak memory of every attention mechanism.

Inputs are ``(batch, heads, S, head_dim)`` tensors as the multi-head wrapper passes them (default 1 x 16 heads x
head dim 128, bf16, S in 1k..16k). For each sequence length it times, in the same process:

- ``sdpa``: dense ``scaled_dot_product_attention`` (no mask: flash kernel);
- ``sdpa_masked``: the same with a materialized ``S x S`` bool mask built in the step (counted in its memory);
- ``naive``: softmax attention written out (``S x S`` scores materialized): attention with a materialized mask;
- each mechanism, and for the pattern ones (local, random, global) also ``<name>_masked_reference``: SDPA with the
  mechanism's pattern materialized as an ``S x S`` mask; the mechanism's output is checked against it.

The approximations run compiled (``torch.compile`` of the module, as the recipes' regional compile runs them, one
compile per length) and, as ``<name>_eager``, uncompiled; ``--approx-modes`` picks. The pattern mechanisms always run
their own CUDA kernels (``local``: FlashAttention-4's sliding window with the ``fa4`` extra, else FlashAttention-2's,
where it applies, column ``kernel``; the others compiled FlexAttention). ``--local-variant NAME=JSON`` adds a
``local[NAME]`` row, FlexAttention unless the JSON names another kernel (``auto``, ``fa4``, ``flash``), with its
tuning: ``{"kernel_options": {...}, "block_size": 64, "mode": "max-autotune-no-cudagraphs"}`` (a variant whose kernel fails is recorded as an error, not as the fallback's time).

Time (``time_ms``, what TFLOP/s counts): on CUDA, the forward + backward captured once in a CUDA graph and replayed,
CUDA events around each replay, median: the device's time without the host's. ``launch_ms``: the same step launched
from Python back to back (events recorded without a host sync in the timed loop, as in the step benchmarks): at
batch 1 the host's per-call overhead (TorchDynamo guards, Python, many small kernels) can exceed the device time, and
this column shows it. A step that cannot be captured is timed by its launches (``timing`` says which). Memory: peak
allocated during one more forward + backward, above what the inputs already hold. TFLOP/s counts useful FLOPs only
(attended query-key pairs, ``4 D`` per pair forward, x3.5 for forward + backward); approximations (linformer,
nystrom, orthoformer, favor) get none. A pattern mechanism whose output differs from its masked reference by more
than bf16 noise (or is NaN) gets status ``wrong`` and counts for no target. Runs that do not fit are recorded as
``"oom"``. ``--smoke`` (and any run without CUDA) is a tiny float32 CPU version for tests. Prints a table and writes
JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mmtrain.bench._timing import time_steps
from mmtrain.modules.attention import (
    FavorAttention,
    GlobalAttention,
    LinformerAttention,
    LocalAttention,
    NystromAttention,
    OrthoFormerAttention,
    RandomAttention,
    ScaledDotProduct,
)
from mmtrain.modules.attention.local import KERNELS
from mmtrain.modules.attention.pattern import PatternAttention, set_flex_compile_mode
from mmtrain.training.distributed import raise_recompile_limit

FORWARD_BACKWARD_FLOP_FACTOR = 3.5  # backward ~ 2.5x forward, the convention of FlashAttention's benchmarks
PATTERN_MECHANISMS = ("local", "random", "global")
ALL_MECHANISMS = ("local", "random", "global", "linformer", "nystrom", "favor", "orthoformer")
APPROX_MODES = ("compiled", "eager")
# Largest |mechanism - SDPA with the same pattern as a mask| accepted; bf16 outputs of unit-variance inputs.
_REFERENCE_TOLERANCE = {torch.bfloat16: 0.05, torch.float32: 1e-4}


def _local_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, spec = text.partition("=")
    variant = json.loads(spec) if spec else {}
    unknown = set(variant) - {"kernel", "kernel_options", "block_size", "mode"}
    if not name or not isinstance(variant, dict) or unknown or variant.get("kernel", "flex") not in KERNELS:
        raise argparse.ArgumentTypeError(
            f"--local-variant takes NAME=JSON with keys kernel ({'/'.join(KERNELS)}), kernel_options, block_size, "
            f"mode; got {text!r}")
    return name, variant


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmtrain bench attention", description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=513, help="local attention window (odd)")
    parser.add_argument("--mechanisms", type=lambda s: s.split(","), default=list(ALL_MECHANISMS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-references", action="store_true", help="skip sdpa_masked, naive and masked references")
    parser.add_argument("--approx-modes", type=lambda s: s.split(","), default=list(APPROX_MODES),
                        help="how the approximations run: compiled (rows <name>), eager (rows <name>_eager)")
    parser.add_argument("--local-variant", type=_local_variant, action="append", default=[], metavar="NAME=JSON",
                        help="extra local-attention row with FlexAttention tuning (repeatable)")
    parser.add_argument("--out", default="bench_results/attention.json")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 run on CPU (for tests)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.mechanisms) - set(ALL_MECHANISMS))
    if unknown:
        parser.error(f"unknown mechanisms {unknown}; choose from {', '.join(ALL_MECHANISMS)}")
    unknown = sorted(set(args.approx_modes) - set(APPROX_MODES))
    if unknown or not args.approx_modes:
        parser.error(f"--approx-modes takes a comma list of {', '.join(APPROX_MODES)}; got {args.approx_modes}")
    return args


def _build(name: str, seq_len: int, heads: int, head_dim: int, window: int) -> torch.nn.Module:
    if name == "local":
        return LocalAttention(window_size=window)
    if name == "random":
        return RandomAttention(r=0.01)
    if name == "global":
        return GlobalAttention(attention_query_mask=16)
    if name == "linformer":
        return LinformerAttention(seq_len=seq_len, k=min(256, seq_len))
    if name == "nystrom":
        return NystromAttention(num_heads=heads, num_landmarks=64)
    if name == "favor":
        return FavorAttention(dim_head=head_dim)
    if name == "orthoformer":
        return OrthoFormerAttention(num_landmarks=32)
    raise ValueError(name)


def _count_pairs(attention: PatternAttention, seq_len: int, device: torch.device) -> int:
    """Attended (query, key) pairs of a pattern, counted in row blocks (never an S x S tensor at once)."""
    keep = attention.make_keep(seq_len, seq_len, device)
    kv_idx = torch.arange(seq_len, device=device)[None, :]
    total = 0
    for start in range(0, seq_len, 1024):
        q_idx = torch.arange(start, min(seq_len, start + 1024), device=device)[:, None]
        total += int(keep(q_idx, kv_idx).expand(q_idx.shape[0], seq_len).sum())
    return total


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _measure(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> dict[str, Any]:
    """``time_ms``, ``launch_ms``, ``timing`` and ``peak_mem_mb`` of ``step`` (one forward + backward).

    ``launch_ms``: median of back-to-back calls as launched from Python. On CUDA ``time_ms`` is the median replay of
    the step captured in a CUDA graph: the device's time alone, which at batch 1 the host's launch overhead (guards,
    Python, small kernels) can exceed; a step that cannot be captured keeps ``launch_ms`` as its time.
    ``peak_mem_mb``: peak allocated during one more step, above what was held before (None on CPU).
    """
    launch_ms = statistics.median(t * 1e3 for t in time_steps(step, warmup=warmup, steps=iters, device=device))
    figures: dict[str, Any] = {"time_ms": launch_ms, "launch_ms": launch_ms, "timing": "launches",
                               "peak_mem_mb": None}
    if device.type != "cuda":
        return figures
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    figures["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - held) / 2**20
    try:
        figures["time_ms"] = _graph_replay_ms(step, device, iters)
        figures["timing"] = "cuda graph"
    except Exception as err:  # noqa: BLE001 - a step that syncs or allocates on the host cannot be captured
        figures["timing"] = f"launches (no cuda graph: {type(err).__name__})"
        torch.cuda.synchronize()
    return figures


def _graph_replay_ms(step: Callable[[], None], device: torch.device, iters: int) -> float:
    torch.cuda.empty_cache()  # the graph's private pool cannot reuse what the launched steps left cached
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture wants its warm-up off the default stream
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
        replays = time_steps(graph.replay, warmup=2, steps=max(iters, 20), device=device)
        return statistics.median(t * 1e3 for t in replays)
    finally:
        del graph
        torch.cuda.empty_cache()


def _bench_sequence_length(args: argparse.Namespace, seq_len: int, device: torch.device, dtype: torch.dtype,
                           batch: int, heads: int, head_dim: int, window: int, warmup: int,
                           iters: int) -> list[dict[str, Any]]:
    """Rows for one sequence length: the baselines, then each mechanism (and its masked reference)."""
    results: list[dict[str, Any]] = []
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dtype, generator=generator)

    def record(name: str, forward: Callable[[], torch.Tensor], pairs: int | None,
               reference_of: str | None = None, fell_back: Callable[[], bool] = lambda: False,
               **extra: Any) -> torch.Tensor | None:
        def step() -> None:
            for tensor in (q, k, v):
                tensor.grad = None
            forward().backward(grad_out)

        row: dict[str, Any] = {"mechanism": name, "seq_len": seq_len, "time_ms": None, "launch_ms": None,
                               "peak_mem_mb": None, "tflops": None, "useful_pairs": pairs, "status": "ok"}
        if reference_of:
            row["reference_of"] = reference_of
        row.update(extra)
        output = None
        try:
            row.update(_measure(step, device, warmup, iters))
            with torch.no_grad():
                output = forward()
            if fell_back():
                row.update(status="error: FlexAttention failed, the masked fallback ran", time_ms=None,
                           launch_ms=None, peak_mem_mb=None)
            if callable(row.get("kernel")):
                row["kernel"] = row["kernel"]()
        except torch.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as err:  # noqa: BLE001 - kernels that refuse a size or a tuning: recorded, not fatal
            row["status"] = f"error: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        finally:
            for tensor in (q, k, v):
                tensor.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if row["time_ms"] and pairs:
            flops = 4 * batch * heads * head_dim * pairs * FORWARD_BACKWARD_FLOP_FACTOR
            row["tflops"] = flops / (row["time_ms"] * 1e-3) / 1e12
        results.append(row)
        # One line per measurement as it lands, so a run stopped at a time limit still reports what it measured.
        print(json.dumps(row), flush=True)
        return output

    # On CPU (--smoke) the compiled rows trace through TorchDynamo only: inductor's C++ build would dominate a test.
    compile_backend = "inductor" if device.type == "cuda" else "eager"
    dense = ScaledDotProduct()
    record("sdpa", lambda: dense(q, k, v), seq_len * seq_len)
    if not args.no_references:
        # The mask is built inside the step so that its S x S bytes count in the peak.
        record("sdpa_masked", lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)), seq_len * seq_len)
        record("naive", lambda: _naive(q, k, v), seq_len * seq_len)

    for name in args.mechanisms:
        attention = _build(name, seq_len, heads, head_dim, window).to(device)
        if name == "linformer":
            attention = attention.to(dtype)
        if not isinstance(attention, PatternAttention):
            for mode in args.approx_modes:
                # One compiled module per length: its kernels are specialized to the shape, as in a recipe's run.
                module = attention if mode == "eager" else torch.compile(attention, backend=compile_backend,
                                                                         dynamic=False)
                record(name if mode == "compiled" else f"{name}_eager",
                       lambda module=module: module(q, k, v), None, mode=mode)
            continue
        pairs = _count_pairs(attention, seq_len, device)
        outputs = {name: record(name, lambda attention=attention: attention(q, k, v), pairs,
                                fell_back=lambda attention=attention: attention._flex_failed,
                                kernel=lambda attention=attention: attention.last_kernel)}
        if name == "local":
            for variant_name, variant in args.local_variant:
                outputs[f"local[{variant_name}]"] = _record_local_variant(record, (q, k, v), variant_name, variant,
                                                                          pairs, window)
        if not args.no_references:
            pattern = attention.pattern(seq_len, seq_len, device=device)
            reference = record(f"{name}_masked_reference",
                               lambda pattern=pattern: F.scaled_dot_product_attention(q, k, v, attn_mask=pattern), pairs,
                               reference_of=name)
            for row_name, output in outputs.items():
                if output is None or reference is None:
                    continue
                row = next(r for r in results if r["mechanism"] == row_name)
                error = float((output.float() - reference.float()).abs().max())
                row["max_abs_err_vs_reference"] = error
                if not error <= _REFERENCE_TOLERANCE[dtype]:  # NaN included: a fast wrong kernel is no result
                    row["status"] = f"wrong: differs from its masked reference by {error:.3g}"
                    print(json.dumps(row), flush=True)

    return results


def _record_local_variant(record: Callable[..., Any], q_k_v: tuple[torch.Tensor, ...], name: str,
                          variant: dict[str, Any], pairs: int, window: int) -> torch.Tensor | None:
    """Time a ``local[name]`` row: a fresh LocalAttention with the variant's kernel (FlexAttention unless it names
    ``auto``, ``fa4`` or ``flash``), block size, kernel options and mode."""
    tuned = LocalAttention(window_size=window)
    tuned.kernel = variant.get("kernel", "flex")
    tuned.block_size = int(variant.get("block_size", tuned.block_size))
    tuned.kernel_options = dict(variant.get("kernel_options", {}))
    mode = variant.get("mode")
    if mode:
        set_flex_compile_mode(mode)
    try:
        return record(f"local[{name}]", lambda: tuned(*q_k_v), pairs, fell_back=lambda: tuned._flex_failed,
                      variant=variant, kernel=lambda: tuned.last_kernel)
    finally:
        if mode:
            set_flex_compile_mode(None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        device, dtype = torch.device("cpu"), torch.float32
        seq_lens, batch, heads, head_dim, window = [64, 128], 1, 2, 16, 9
        warmup, iters = 1, 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        seq_lens, batch, heads, head_dim, window = args.seq_lens, args.batch, args.heads, args.head_dim, args.window
        warmup, iters = args.warmup, args.iters
    if not smoke:
        # Every (pattern, sequence length) compiles its own FlexAttention kernel; the default limit of 8 per function
        # would send later ones to the eager (materializing) path.
        raise_recompile_limit(64)
    results: list[dict[str, Any]] = []

    for seq_len in seq_lens:
        results.extend(_bench_sequence_length(args, seq_len, device, dtype, batch, heads, head_dim, window,
                                              warmup, iters))

    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "local_window": window,
        "smoke": smoke,
        "results": results,
        "summary": _summary(results, max(seq_lens)),
    }


def _find(results: list[dict[str, Any]], name: str, seq_len: int) -> dict[str, Any] | None:
    return next((r for r in results if r["mechanism"] == name and r["seq_len"] == seq_len and r["status"] == "ok"),
                None)


def _summary(results: list[dict[str, Any]], longest: int) -> dict[str, Any]:
    """The issue's targets at the longest sequence: local vs dense useful TFLOP/s, memory vs a materialized mask."""
    summary: dict[str, Any] = {"seq_len": longest}
    dense, local = _find(results, "sdpa", longest), _find(results, "local", longest)
    if dense and local and dense["tflops"] and local["tflops"]:
        summary["local_tflops_fraction_of_dense"] = local["tflops"] / dense["tflops"]
    naive, masked = _find(results, "naive", longest), _find(results, "sdpa_masked", longest)
    for name in ("linformer", "nystrom", "favor", "orthoformer"):
        row = _find(results, name, longest)
        if row is None:
            continue
        for label, baseline in (("naive", naive), ("sdpa_masked", masked)):
            if baseline and baseline["peak_mem_mb"] and row["peak_mem_mb"] is not None:
                summary[f"{name}_memory_fraction_of_{label}"] = row["peak_mem_mb"] / baseline["peak_mem_mb"]
        if dense and dense["time_ms"]:
            summary[f"{name}_speedup_vs_dense"] = dense["time_ms"] / row["time_ms"]
    return summary


def _format_table(report: dict[str, Any]) -> str:
    title = (f"attention fwd+bwd on {report['device']} ({report['dtype']}, batch {report['batch']}, "
             f"{report['heads']} heads x {report['head_dim']})")
    lines = [title,
             f"{'mechanism':<28}{'seq':>7}{'ms':>10}{'launch ms':>10}{'peak MiB':>11}{'TFLOP/s':>9}  status"]
    for row in report["results"]:
        def fmt(value: Any, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        lines.append(f"{row['mechanism']:<28}{row['seq_len']:>7}{fmt(row['time_ms'], '.3f'):>10}"
                     f"{fmt(row.get('launch_ms'), '.3f'):>10}"
                     f"{fmt(row['peak_mem_mb'], '.1f'):>11}{fmt(row['tflops'], '.3g'):>9}  {row['status']}")
    for key, value in report["summary"].items():
        lines.append(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    report = run(args)
    print(_format_table(report))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x)
                              else str(x)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
