"""Benchmark: training step (forward + backward + AdamW) of the Llama 3.2 11B-Vision-shaped encoder, bf16.

Input per step: images (batch, images, tiles, 3, 560, 560) with every image a 2x2 tile grid, i.e. 1601 tokens per
tile and ``images * tiles * 1601`` tokens per sequence. Reports tiles/s (median over timed steps, CUDA events after
warm-up), counted TFLOP/s (torch.utils.flop_counter over one real step), MFU against the measured bf16 matmul peak,
and peak memory; torchtune's ``llama3_2_vision_encoder`` runs in the same process when ``import torchtune`` works.

    mmtrain bench vision_encoder [--steps 10] [--no-compile] [--cuda-graph] [--ac] [--sdpa-backends auto,fa4]
                                 [--fused-qkv auto|on|off|both] [--inductor-modes default,max-autotune-no-cudagraphs]
                                 [--out bench_results/vision_encoder.json]

Each mmtrain variant runs once per ``--sdpa-backends`` entry (named ``... [cudnn]`` for a preference other than
torch's own order), to measure cuDNN's attention against flash attention on the ~6400-token sequences. With
``--cuda-graph`` (CUDA) the compiled (or, with ``--no-compile``, the eager) variant also runs with the whole step
captured once and replayed as one CUDA graph (``... +graph``; ``mmtrain.training.cuda_graph.GraphedStep``, the
recipes' ``cuda_graph``); its peak memory is the capture's. The compiled variant runs once per ``--inductor-modes``
entry (``... (max-autotune-no-cudagraphs)``), each compiled afresh.
    mmtrain bench vision_encoder --smoke      # tiny CPU run (tests use it)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch._inductor
from torch import nn

from mmtrain.bench._timing import measure_variant, step_bench_parser, time_steps
from mmtrain.errors import ConfigError
from mmtrain.models.llama3_2_vision._component_builders import llama3_2_vision_encoder
from mmtrain.modules.attention.multi_head import apply_fused_qkv_setting
from mmtrain.modules.attention.sdpa_backend import sdpa_backend, sdpa_backend_order
from mmtrain.training.cuda_graph import GraphedStep

ELEVEN_B = dict(patch_size=14, num_heads=16, clip_embed_dim=1280, clip_num_layers=32,
                clip_hidden_states=[3, 7, 15, 23, 30], num_layers_projection=8, decoder_embed_dim=4096,
                tile_size=560, max_num_tiles=4, in_channels=3)
SMOKE = dict(patch_size=2, num_heads=2, clip_embed_dim=16, clip_num_layers=2, clip_hidden_states=[0],
             num_layers_projection=1, decoder_embed_dim=8, tile_size=4, max_num_tiles=2, in_channels=3)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = step_bench_parser("vision_encoder", __doc__, batch=1, smoke_help="tiny config on CPU, 2 steps (for tests)",
                          compile_help="skip the regionally compiled mmtrain variant")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--tiles", type=int, default=4)
    p.add_argument("--no-eager", action="store_true", help="skip the eager mmtrain variant")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also run the step replayed as one CUDA graph (CUDA only; on an H100 it gained nothing here, "
                        "the encoder's kernels already keep the GPU busy)")
    p.add_argument("--ac", action="store_true",
                   help="also run mmtrain compiled with per-layer activation checkpointing")
    p.add_argument("--no-torchtune", action="store_true", help="do not run torchtune even if importable")
    p.add_argument("--torchtune-last", action="store_true",
                   help="run torchtune after the mmtrain variants (default: first)")
    p.add_argument("--fused-qkv", choices=("auto", "on", "off", "both"), default="auto",
                   help="mmtrain's attention projects q, k, v with one matmul (MultiHeadAttention's fused_qkv; on FA4 "
                        "the attention reads the packed projection in place). auto: as the recipes' fused_qkv: auto, "
                        "on in the fa4 variants; both: each variant with and without (`+fqkv` in the name)")
    p.add_argument("--sdpa-backends", default=None,
                   help="comma list: the mmtrain variants run once per SDPA kernel preference (auto = torch's order; "
                        "cudnn/flash/efficient/math first; fa4: FlashAttention-4, with the fa4 extra). Default: auto, "
                        "and fa4 where it loads on a Hopper-or-later GPU")
    p.add_argument("--inductor-modes", default="default",
                   help="comma list of torch.compile modes for the compiled variant, each its own variant (e.g. "
                        "default,max-autotune-no-cudagraphs: Triton GEMM templates with fused epilogues, "
                        "minutes of autotuning at the start)")
    return p.parse_args(argv)


def _inputs(cfg: dict[str, Any], batch: int, images: int, tiles: int, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    size = cfg["tile_size"]
    torch.manual_seed(0)
    pixels = torch.randn(batch, images, tiles, 3, size, size, device=device, dtype=dtype)
    rows = 2 if tiles >= 4 else 1
    cols = max(1, tiles // rows)
    aspect = torch.tensor([rows, cols], device=device).expand(batch, images, 2).contiguous()
    return pixels, aspect


def _checkpoint_layers(model: nn.Module) -> None:
    """Wrap every repeated layer in activation checkpointing (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layer_modules():
        forward = layer.forward

        def checkpointed(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed  # type: ignore[method-assign]


def _run_variant(name: str, build: Callable[[], nn.Module], args: argparse.Namespace, cfg: dict[str, Any],
                 device: torch.device, dtype: torch.dtype, compile_layers: bool, ac: bool,
                 sdpa: str = "auto", cuda_graph: bool = False, inductor_mode: str = "default") -> dict[str, Any]:
    # compile included: a compiled graph keeps the attention kernel chosen while it was traced
    def measure() -> dict[str, Any]:
        with sdpa_backend(sdpa):
            result = _measure_variant(name, build, args, cfg, device, dtype, compile_layers, ac, cuda_graph,
                                      inductor_mode)
        return {**result, "sdpa_backend": sdpa}

    return measure_variant(name, measure, sdpa_backend=sdpa, step_s_median=None, tiles_per_s=None,
                           flops_per_step=None, tflops_per_s=None, peak_memory_gib=None)


def _measure_variant(name: str, build: Callable[[], nn.Module], args: argparse.Namespace, cfg: dict[str, Any],
                     device: torch.device, dtype: torch.dtype, compile_layers: bool, ac: bool,
                     cuda_graph: bool = False, inductor_mode: str = "default") -> dict[str, Any]:
    gc.collect()
    torch._dynamo.reset()  # a variant compiled in another inductor mode must not be reused from the code cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = build().to(device=device, dtype=dtype)
    model.train()
    pixels, aspect = _inputs(cfg, args.batch, args.images, args.tiles, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def one_step(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)  # noqa: F821 - first: a graphed step allocates the grads in its pool
        out = model(inputs["pixels"], inputs["aspect"])  # noqa: F821
        loss = out.float().square().mean()
        loss.backward()
        optimizer.step()  # noqa: F821
        return (loss.detach(),)

    batch = {"pixels": pixels, "aspect": aspect}
    step = partial(one_step, batch)

    flops = None
    try:  # counted FLOPs of one step, eager (compile does not change the math)
        from mmtrain.training.throughput import count_flops

        flops, _ = count_flops(step)
    except Exception:  # noqa: BLE001 - the counter is best effort; timings still stand
        flops = None

    if ac and hasattr(model, "layer_modules"):
        _checkpoint_layers(model)
    if compile_layers:
        layers = model.layer_modules() if hasattr(model, "layer_modules") else (
            list(model.clip.layers) + list(model.projection.layers))
        for layer in layers:
            layer.compile(mode=inductor_mode)
    if cuda_graph:
        graphed = GraphedStep(one_step, optimizer)
        step = partial(graphed, batch)
        for _ in range(graphed.warmup_steps):  # eager (or compiling) steps
            step()
        torch.cuda.synchronize()
        # Replays allocate nothing: the step's memory is what the capture took, so the peak counts from before it.
        torch.cuda.reset_peak_memory_stats()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda" and not cuda_graph:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the timed steps' peak, not the compile's
    times = time_steps(step, warmup=0, steps=args.steps, device=device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    seconds = statistics.median(times)
    n_tiles = args.batch * args.images * args.tiles
    result: dict[str, Any] = {
        "name": name,
        "step_s_median": seconds,
        "tiles_per_s": n_tiles / seconds,
        "flops_per_step": flops,
        "tflops_per_s": (flops / seconds / 1e12) if flops else None,
        "peak_memory_gib": (peak / 2**30) if peak is not None else None,
        "params": sum(p.numel() for p in model.parameters()),
        "compiled": compile_layers,
        "inductor_mode": inductor_mode if compile_layers else None,
        "fused_qkv": any(getattr(m, "fused_qkv", False) for m in model.modules()),
        "cuda_graph": cuda_graph,
        "activation_checkpointing": ac,
    }
    del model, optimizer, pixels, aspect, batch, step
    return result


def _torchtune_builder(cfg: dict[str, Any]) -> Callable[[], nn.Module] | None:
    try:
        from torchtune.models.llama3_2_vision import llama3_2_vision_encoder as tt_encoder
    except Exception as err:  # noqa: BLE001 - torchtune absent or incompatible with this torch: skip the peer
        print(f"torchtune not run: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    return lambda: tt_encoder(**cfg)


def _default_backends(device: torch.device) -> str:
    from mmtrain.modules.attention.fa4 import fa4_module

    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
    return "auto,fa4" if hopper and fa4_module() is not None else "auto"


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(argv or []))
    if args.smoke:
        cfg, device, dtype = SMOKE, torch.device("cpu"), torch.float32
        args.batch, args.images, args.tiles = 1, 2, 2
        args.steps, args.warmup = 2, 1
        args.no_compile, args.ac, args.no_torchtune = True, False, True
    else:
        cfg = ELEVEN_B
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True

    results: list[dict[str, Any]] = []

    def ours_with(fused_qkv: bool | str, backend: str) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            model = llama3_2_vision_encoder(**cfg)
            apply_fused_qkv_setting(model, fused_qkv, backend)
            return model
        return build

    fusings = {"auto": ["auto"], "on": [True], "off": [False], "both": [False, True]}[args.fused_qkv]
    backends = [name.strip() for name in (args.sdpa_backends or _default_backends(device)).split(",") if name.strip()]
    backends = backends or ["auto"]
    for backend in backends:
        sdpa_backend_order(backend)  # an unknown name fails here, before any variant runs
    inductor_modes = [name.strip() for name in args.inductor_modes.split(",") if name.strip()] or ["default"]
    unknown = sorted(set(inductor_modes) - set(torch._inductor.list_mode_options()))
    if unknown:
        raise ConfigError(f"--inductor-modes: unknown {', '.join(unknown)}; "
                         f"expected {', '.join(torch._inductor.list_mode_options())}")

    def run_torchtune() -> str | None:
        builder = None if args.no_torchtune else _torchtune_builder(cfg)
        if builder is None:
            return None
        import torchtune

        results.append(_run_variant("torchtune eager", builder, args, cfg, device, dtype, compile_layers=False,
                                    ac=False))
        return getattr(torchtune, "__version__", "unknown")

    # The peer runs first by default, in a fresh process: nothing compiled yet, no kernel preference set, no
    # allocator blocks cached by our variants.
    torchtune_version = None if args.torchtune_last else run_torchtune()
    for backend, fused_qkv in ((b, f) for b in backends for f in fusings):
        tag = ("+fqkv" if fused_qkv is True and args.fused_qkv == "both" else "")
        tag += "" if backend == "auto" else f" [{backend}]"
        ours = ours_with(fused_qkv, backend)
        if not args.no_eager:
            results.append(_run_variant(f"mmtrain eager{tag}", ours, args, cfg, device, dtype, compile_layers=False,
                                        ac=False, sdpa=backend))
        if not args.no_compile:
            for mode in inductor_modes:
                mode_tag = "" if mode == "default" else f" ({mode})"
                results.append(_run_variant(f"mmtrain compiled{tag}{mode_tag}", ours, args, cfg, device, dtype,
                                            compile_layers=True, ac=False, sdpa=backend, inductor_mode=mode))
        if device.type == "cuda" and args.cuda_graph:
            kind = "eager" if args.no_compile else "compiled"
            results.append(_run_variant(f"mmtrain {kind}+graph{tag}", ours, args, cfg, device, dtype,
                                        compile_layers=not args.no_compile, ac=False, sdpa=backend, cuda_graph=True))
        if args.ac:
            results.append(_run_variant(f"mmtrain compiled+ac{tag}", ours, args, cfg, device, dtype,
                                        compile_layers=not args.no_compile, ac=True, sdpa=backend))
    if args.torchtune_last:
        torchtune_version = run_torchtune()

    peak_flops = None
    if device.type == "cuda":
        try:
            from mmtrain.training.throughput import measure_peak_flops

            peak_flops = measure_peak_flops(device, torch.bfloat16)
        except Exception:  # noqa: BLE001
            peak_flops = None
    for r in results:
        r["mfu"] = (r["tflops_per_s"] * 1e12 / peak_flops) if (peak_flops and r["tflops_per_s"]) else None
    baseline = next((r for r in results if r["name"] == "torchtune eager" and r["tiles_per_s"]), None)
    if baseline:
        for r in results:
            if not r["tiles_per_s"]:
                continue
            r["speedup_vs_torchtune"] = r["tiles_per_s"] / baseline["tiles_per_s"]
            if r["peak_memory_gib"] and baseline["peak_memory_gib"]:
                r["memory_vs_torchtune"] = r["peak_memory_gib"] / baseline["peak_memory_gib"]

    report = {
        "benchmark": "vision_encoder",
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torchtune": torchtune_version,
        "dtype": str(dtype),
        "config": cfg,
        "batch": {"batch": args.batch, "images": args.images, "tiles": args.tiles},
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "measured_bf16_peak_tflops": peak_flops / 1e12 if peak_flops else None,
        "results": results,
    }
    header = f"{'variant':<30}{'tiles/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'vs tt':>8}"
    print(header)
    for r in results:
        fmt = lambda v, f: (f % v) if v is not None else "-"
        print(f"{r['name']:<30}{fmt(r['tiles_per_s'], '%.2f'):>10}{fmt(r['tflops_per_s'], '%.1f'):>10}"
              f"{fmt(r['mfu'], '%.2f'):>8}{fmt(r['peak_memory_gib'], '%.1f'):>10}"
              f"{fmt(r.get('speedup_vs_torchtune'), '%.2fx'):>8}")
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
