"""Benchmark: data-parallel scaling of the contrastive training step (clip_vit_b16, align_base) on 1..N GPUs.

For each world size the benchmark re-launches itself through ``torch.distributed.run`` (one process per GPU, NCCL;
gloo on CPU), every rank runs forward + gathered contrastive loss + backward (DDP all-reduce or FSDP2
reduce-scatter) + fused AdamW on a fixed per-GPU batch (weak scaling, bf16 compute), and rank 0 writes the median
step time (CUDA events after warm-up). The parent collects one JSON per world size and prints samples/s and the
speed-up over one GPU (the target is >= 1.9x on 2). On several ranks it also times a 256 MiB fp32 all-reduce and
reports its bus bandwidth, the figure that bounds the gradient exchange.

    mmtrain bench scaling [--models clip_vit_b16,align_base] [--world-sizes 1,2] [--batch-per-gpu 256]
                          [--strategy ddp,ddp:bf16,fsdp] [--out bench_results/scaling.json]

``--strategy`` lists the data-parallel variants to compare, each ``ddp`` or ``fsdp`` with an optional ``:bf16``
(gradients reduced in bf16, ``distributed.reduce_dtype: bf16`` in a recipe). One process wraps nothing, so world
size 1 runs once per model and is every variant's baseline.
    mmtrain bench scaling --smoke      # tiny models, CPU, gloo, 1 and 2 ranks (tests use it)

Shapes per rank: pixel_values (b, 3, S, S), input_ids / attention_mask (b, L); the loss sees (world * b) pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["main"]

MODELS = ("clip_vit_b16", "align_base")
SMOKE_MODELS = ("clip_tiny", "align_tiny")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmtrain bench scaling", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU with gloo, 1 and 2 ranks (for tests)")
    p.add_argument("--out", default="bench_results/scaling.json", help="JSON results file")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: clip_vit_b16, align_base")
    p.add_argument("--world-sizes", default=None, help="comma-separated (default: 1, 2, 4, ... up to the GPUs)")
    p.add_argument("--batch-per-gpu", type=int, default=None,
                   help="default 256 (clip) / 64 (align), the batches of the one-GPU step benchmarks")
    p.add_argument("--strategy", default="ddp",
                   help="comma-separated variants: ddp, fsdp, each optionally :bf16 (bf16 gradient reduction)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the layers")
    p.add_argument("--precision", default=None, choices=("bf16", "fp32"),
                   help="compute dtype (default: bf16 on GPUs, fp32 on CPU)")
    # Internal: the per-rank worker that the parent launches through torch.distributed.run.
    p.add_argument("--worker-result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class _ContrastiveStep(nn.Module):
    """Model and loss as one module whose forward is the whole loss, so DDP arms its all-reduce in forward."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.model.encode_image(pixel_values)
        text = self.model.encode_text(input_ids, attention_mask)
        return self.loss(image, text, self.model.get_logit_scale(), self.model.get_logit_bias())

    def layer_modules(self) -> list[nn.Module]:
        getter = getattr(self.model, "layer_modules", None)
        return list(getter()) if callable(getter) else []


def _build(name: str) -> tuple[nn.Module, nn.Module, dict[str, int]]:
    """(model, loss, input shapes) for one benchmark model."""
    from mmtrain.losses import AlignLoss, ClipLoss

    torch.manual_seed(0)
    if name == "clip_vit_b16":
        from mmtrain.models.clip._dual_builders import clip_vit_b16

        return clip_vit_b16(), ClipLoss(gather=True), {"image": 224, "seq": 77, "vocab": 49408, "batch": 256}
    if name == "clip_tiny":
        from mmtrain.models.clip._dual_builders import clip_tiny

        return clip_tiny(vocab_size=64, image_size=16), ClipLoss(gather=True), {"image": 16, "seq": 8, "vocab": 64,
                                                                                   "batch": 4}
    if name == "align_base":
        from mmtrain.models.align import align_base

        return align_base(), AlignLoss(gather=True), {"image": 289, "seq": 64, "vocab": 30522, "batch": 64}
    if name == "align_tiny":
        from mmtrain.models.align import align_tiny

        model = align_tiny(vocab_size=64, image_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, vision_width=16)
        return model, AlignLoss(gather=True), {"image": 16, "seq": 8, "vocab": 64, "batch": 4}
    raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(MODELS + SMOKE_MODELS)}")


def _variants(spec: str) -> list[tuple[str, str | None]]:
    """"ddp,fsdp:bf16" -> [("ddp", None), ("fsdp", "bf16")]; a ValueError names a bad entry."""
    variants = []
    for entry in spec.split(","):
        strategy, _, reduce_dtype = entry.strip().partition(":")
        if strategy not in ("ddp", "fsdp") or reduce_dtype not in ("", "bf16", "fp32"):
            raise ValueError(f"--strategy: {entry!r} is not ddp or fsdp with an optional :bf16 or :fp32")
        variants.append((strategy, reduce_dtype or None))
    return variants


def _variant_name(strategy: str, reduce_dtype: str | None) -> str:
    return strategy + (f":{reduce_dtype}" if reduce_dtype else "")


def _worker_one(name: str, strategy: str, reduce_dtype: str | None, args: argparse.Namespace,
                info: Any) -> dict[str, Any]:
    from mmtrain.training import distributed

    device = info.device
    model, loss, shapes = _build(name)
    batch_size = args.batch_per_gpu or shapes["batch"]
    step_module = _ContrastiveStep(model, loss)
    bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    if args.compile:
        distributed.compile_model(model, mode="regional")
    # As the recipe: ALIGN's text pooler (never reached by the loss) frozen, so DDP skips the unused-parameter search.
    find_unused = distributed.freeze_unused_contrastive_parameters(model)
    wrapped = distributed.wrap_model(step_module, strategy=strategy, device=device,
                                     mixed_precision="bf16" if bf16 else None,
                                     find_unused_parameters=find_unused, reduce_dtype=reduce_dtype)
    sharded = strategy == "fsdp" and info.is_distributed
    strategy_label = _variant_name(strategy, reduce_dtype)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4,
                                  fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(info.rank)
    pixels = torch.randn(batch_size, 3, shapes["image"], shapes["image"], generator=gen).to(device)
    ids = torch.randint(1, shapes["vocab"], (batch_size, shapes["seq"]), generator=gen).to(device)
    mask = torch.ones_like(ids)
    use_cuda = device.type == "cuda"

    def one_step() -> None:
        # DDP and one process compute in bf16 under autocast; FSDP2 casts parameters to bf16 itself.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not sharded):
            loss_value = wrapped(pixels, ids, mask)
        loss_value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(args.warmup):
            one_step()
        distributed.barrier()
        if use_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(args.steps)]
            for start, end in events:
                start.record()
                one_step()
                end.record()
            torch.cuda.synchronize(device)
            times = [start.elapsed_time(end) / 1000 for start, end in events]
        else:
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                one_step()
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        return {"model": name, "world_size": info.world_size, "strategy": strategy_label, "error": "out of memory"}
    # The slowest rank sets the pace: take the max over ranks of each rank's median.
    step_t = torch.tensor(statistics.median(times), dtype=torch.float64, device=device)
    if info.is_distributed:
        torch.distributed.all_reduce(step_t, op=torch.distributed.ReduceOp.MAX)
    step_s = float(step_t)
    result = {"model": name, "world_size": info.world_size, "strategy": strategy_label,
              "batch_per_gpu": batch_size, "global_batch": batch_size * info.world_size, "step_s": step_s,
              "samples_per_s": batch_size * info.world_size / step_s}
    if use_cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _allreduce_bus_bandwidth(info: Any, mib: int = 256, iters: int = 10) -> float:
    """Bus bandwidth (GB/s, NCCL-tests' definition) of an fp32 all-reduce of ``mib`` MiB: the median of ``iters``."""
    tensor = torch.ones(mib * 2**20 // 4, device=info.device)
    for _ in range(3):
        torch.distributed.all_reduce(tensor)
    torch.cuda.synchronize(info.device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.distributed.all_reduce(tensor)
        end.record()
        torch.cuda.synchronize(info.device)
        times.append(start.elapsed_time(end) / 1000)
    n = info.world_size
    return tensor.numel() * 4 * 2 * (n - 1) / n / statistics.median(times) / 1e9


def _worker(args: argparse.Namespace) -> int:
    from mmtrain.training import distributed

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    device = "cpu" if args.smoke else "auto"
    info = distributed.init_distributed(device=device)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # One process wraps nothing: every variant would time the same step.
    variants = _variants(args.strategy) if info.is_distributed else [("none", None)]
    results = []
    for name in args.models.split(","):
        for strategy, reduce_dtype in variants:
            results.append(_worker_one(name, strategy, reduce_dtype, args, info))
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
    busbw = _allreduce_bus_bandwidth(info) if info.is_distributed and info.device.type == "cuda" else None
    if info.is_main:
        Path(args.worker_result).write_text(json.dumps({"results": results, "allreduce_busbw_gbps": busbw}))
    distributed.barrier()
    distributed.destroy()
    return 0


def _launch(world_size: int, args: argparse.Namespace, argv: list[str], result_file: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
           "-m", "mmtrain.bench.scaling", *argv, "--worker-result", str(result_file)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not result_file.exists():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # A rank's own exception line says why; torchrun's summary after it only says that a rank failed.
        raised = [line.strip() for line in lines if re.search(r"\w(Error|Exception): ", line)
                  and "ChildFailedError" not in line]
        message = raised[-1] if raised else " | ".join(lines[-5:]) or f"exit {proc.returncode}"
        return {"results": [{"model": m, "world_size": world_size, "error": message}
                            for m in args.models.split(",")]}
    return json.loads(result_file.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.smoke and args.models == ",".join(MODELS):
        args.models = ",".join(SMOKE_MODELS)
        argv += ["--models", args.models]
    if args.smoke:
        args.steps, args.warmup = 2, 1
        argv += ["--steps", "2", "--warmup", "1"]
    if args.worker_result:
        return _worker(args)
    if args.world_sizes:
        world_sizes = [int(w) for w in args.world_sizes.split(",")]
    elif args.smoke or not torch.cuda.is_available():
        world_sizes = [1, 2]
    else:
        gpus = torch.cuda.device_count()
        world_sizes = [w for w in (1, 2, 4, 8, 16) if w <= gpus]
    _variants(args.strategy)  # a bad --strategy fails here, before any launch
    results: list[dict[str, Any]] = []
    bandwidth: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mmtrain_bench_scaling_") as tmp:
        for world_size in world_sizes:
            launched = _launch(world_size, args, argv, Path(tmp) / f"world_{world_size}.json")
            results += launched["results"]
            if launched.get("allreduce_busbw_gbps"):
                bandwidth[str(world_size)] = launched["allreduce_busbw_gbps"]
    single = {r["model"]: r["samples_per_s"] for r in results if r["world_size"] == 1 and "samples_per_s" in r}
    for r in results:
        if "samples_per_s" in r and r["model"] in single:
            r["speedup"] = r["samples_per_s"] / single[r["model"]]
            r["efficiency"] = r["speedup"] / r["world_size"]
    report = {
        "benchmark": "contrastive_scaling",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "strategy": args.strategy,
        "smoke": args.smoke,
        "allreduce_busbw_gbps": bandwidth,
        "results": results,
    }
    print(f"{'model':<14} {'GPUs':>4} {'variant':<9} {'samples/s':>10} {'speed-up':>8} {'step ms':>8} {'peak GiB':>8}")
    for r in results:
        variant = r.get("strategy", "-")
        if "error" in r:
            print(f"{r['model']:<14} {r['world_size']:>4} {variant:<9} error: {r['error'][:200]}")
            continue
        peak = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"{r['model']:<14} {r['world_size']:>4} {variant:<9} {r['samples_per_s']:>10.1f} {speedup:>8} "
              f"{r['step_s'] * 1000:>8.1f} {peak:>8}")
    for world_size, gbps in bandwidth.items():
        print(f"all-reduce bus bandwidth on {world_size} GPUs (256 MiB fp32): {gbps:.1f} GB/s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    from mmtrain.config._entry import exit_with

    exit_with(main)
