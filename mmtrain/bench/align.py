"""Benchmark: ALIGN training step (align-base: EfficientNet-B7 + BERT-base, 289 px, batch 64, bf16, AdamW).

Each variant runs forward + contrastive loss + backward + optimizer step on random images and 64-token texts.
Reports samples/s (median over timed steps, CUDA events after warm-up) and peak memory. Variants, in this order:
HF transformers' ``AlignModel`` when importable (same optimizer, same autocast), mmtrain eager (channels_last, bf16
autocast, fused AdamW, SDPA), the same step captured once and replayed as a CUDA graph (``mmtrain_cuda_graph``, the
recipe's ``cuda_graph: auto``; ``--no-cuda-graph`` skips it), mmtrain with each MBConv block and BERT layer compiled
(``--compile-modes regional``, the recipe's ``compile: regional``; also graphed unless ``--no-cuda-graph``) and with
the whole step under ``torch.compile`` (``whole``).

    mmtrain bench align [--batch 64] [--steps 10] [--no-compile] [--compile-modes regional,whole] [--no-hf]
                        [--no-cuda-graph] [--out bench_results/align.json]
    mmtrain bench align --smoke      # tiny CPU run (tests use it)
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from mmtrain.bench._report import print_and_write, ratio_to
from mmtrain.bench._timing import measure_variant, step_bench_parser, time_steps
from mmtrain.errors import UserError
from mmtrain.losses import AlignLoss
from mmtrain.models.align import AlignConfig, AlignModel
from mmtrain.training.cuda_graph import GraphedStep
from mmtrain.training.distributed import compile_model

SMOKE_CONFIG = dict(
    text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16),
    vision_config=dict(image_size=32, width_coefficient=0.25, depth_coefficient=1.0, kernel_sizes=[3, 3],
                       in_channels=[32, 16], out_channels=[16, 64], strides=[1, 2], num_block_repeats=[1, 1],
                       expand_ratios=[1, 2], hidden_dim=16),
    projection_dim=16,
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = step_bench_parser("align", __doc__, batch=64, smoke_help="tiny config on CPU, 2 steps (for tests)",
                          compile_help="skip the compiled mmtrain variants")
    p.add_argument("--image-size", type=int, default=289)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--no-hf", action="store_true", help="do not run transformers' AlignModel even if importable")
    p.add_argument("--compile-modes", default="regional,whole",
                   help="compiled mmtrain variants, in order: regional (each MBConv block and BERT layer, what the "
                        "recipe's compile=regional does), whole (the whole step under torch.compile)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="skip the variants whose step is replayed as one CUDA graph (CUDA only)")
    return p.parse_args(argv)


def _config_dict(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:
        return SMOKE_CONFIG
    config = AlignConfig()
    config.vision_config.image_size = args.image_size
    return {"text_config": config.text_config.to_dict(), "vision_config": config.vision_config.to_dict(),
            "projection_dim": 640}


def _batch(args: argparse.Namespace, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    size = 32 if args.smoke else args.image_size
    seq = 8 if args.smoke else args.seq_len
    ids = torch.randint(1, vocab, (args.batch, seq), generator=g)
    mask = torch.ones(args.batch, seq, dtype=torch.long)
    lengths = torch.randint(seq // 4, seq + 1, (args.batch,), generator=g)
    mask[torch.arange(seq)[None, :] >= lengths[:, None]] = 0  # realistic padding
    pixels = torch.randn(args.batch, 3, size, size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": pixels.to(device)}


def _mmtrain_step(model: AlignModel, loss_fn: nn.Module) -> Callable[[dict], torch.Tensor]:
    def step(batch: dict) -> torch.Tensor:
        image = model.encode_image(batch["pixel_values"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        return loss_fn(image, text, model.get_logit_scale())

    return step


def _hf_step(model: nn.Module) -> Callable[[dict], torch.Tensor]:
    def step(batch: dict) -> torch.Tensor:
        return model(**batch, return_loss=True).loss

    return step


def _run_variant(name: str, build: Callable[[], tuple[nn.Module, Callable]], args: argparse.Namespace,
                 device: torch.device, channels_last: bool, cuda_graph: bool = False) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, step_fn = build()
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    batch = _batch(args, 64 if args.smoke else 30522, device)
    if channels_last:
        batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
    autocast_dtype = torch.bfloat16
    times: list[float] = []

    def one_step(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)  # noqa: F821
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=device.type == "cuda"):
            loss = step_fn(inputs)
        loss.backward()
        optimizer.step()  # noqa: F821
        return (loss.detach(),)

    step = partial(one_step, batch)
    if cuda_graph:
        graphed = GraphedStep(one_step, optimizer)
        step = partial(graphed, batch)
        for _ in range(graphed.warmup_steps + 1):  # eager warm-ups and the capture stay out of the timed steps
            step()

    try:
        times = time_steps(step, warmup=args.warmup, steps=args.steps, device=device)
    except torch.cuda.OutOfMemoryError:
        return {"name": name, "error": "out of memory"}
    step_s = statistics.median(times)
    result = {"name": name, "step_s": step_s, "samples_per_s": args.batch / step_s,
              "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.smoke:
        args.batch, args.steps, args.warmup, args.no_compile = min(args.batch, 4), 2, 1, True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    config_dict = _config_dict(args)

    def build_mmtrain(compile_mode: str) -> Callable[[], tuple[nn.Module, Callable]]:
        def build() -> tuple[nn.Module, Callable]:
            torch.manual_seed(0)
            model = AlignModel(AlignConfig(**config_dict))
            if compile_mode == "regional":
                compile_model(model, mode="regional", dynamic=False)  # as the contrastive recipe compiles it
            step = _mmtrain_step(model, AlignLoss(gather=False))
            return model, (torch.compile(step) if compile_mode == "whole" else step)

        return build

    modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"regional", "whole"})
    if unknown:
        raise UserError(f"bench align: --compile-modes: unknown {', '.join(unknown)} (use regional, whole)")
    if args.no_compile:
        modes = []
    # The peer first, in a fresh process; the slowest compile last, so a time limit costs only that variant.
    variants: list[tuple[str, Callable, bool, bool]] = []  # name, build, channels_last, cuda_graph
    hf_error = None
    if not args.no_hf:
        try:
            from transformers import AlignConfig as HFAlignConfig
            from transformers import AlignModel as HFAlignModel

            def build_hf() -> tuple[nn.Module, Callable]:
                torch.manual_seed(0)
                model = HFAlignModel(HFAlignConfig(**config_dict))
                return model, _hf_step(model)

            variants.append(("transformers", build_hf, False, False))
        except ImportError as err:
            hf_error = f"transformers not importable: {err}"
    variants.append(("mmtrain", build_mmtrain("none"), True, False))
    names = {"regional": "mmtrain_regional_compile", "whole": "mmtrain_compiled"}
    graph = device.type == "cuda" and not args.no_cuda_graph
    if graph:
        variants.append(("mmtrain_cuda_graph", build_mmtrain("none"), True, True))
    for mode in modes:
        variants.append((names[mode], build_mmtrain(mode), True, False))
        if graph and mode == "regional":
            variants.append((f"{names[mode]}_cuda_graph", build_mmtrain(mode), True, True))
    results = []
    for name, build, channels_last, cuda_graph in variants:
        results.append(measure_variant(name, partial(_run_variant, name, build, args, device, channels_last,
                                                     cuda_graph)))
    report = {
        "benchmark": "align_train_step",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "image_size": 32 if args.smoke else args.image_size,
        "smoke": args.smoke,
        "results": results,
    }
    if hf_error:
        report["transformers"] = hf_error
    speedup = ratio_to(results, "transformers")
    if speedup is not None:
        report["speedup_vs_transformers"] = speedup
    print_and_write(results, report, args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
