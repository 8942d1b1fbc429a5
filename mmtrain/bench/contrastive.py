"""Benchmark: CLIP ViT-B/16 contrastive training step (224 px, batch 256, bf16 autocast, fused AdamW), and the
``contrastive`` recipe end to end on a JPEG folder.

Step-only variants (random images and 77-token texts already on the device; forward + ClipLoss + backward + AdamW):
``mmtrain`` (eager: SDPA, fused AdamW, no host syncs), ``mmtrain_compiled`` (the whole step under ``torch.compile``),
``mmtrain_regional`` (each transformer layer compiled, the recipe's ``compile: regional``),
and open_clip's ``ViT-B-16`` in the same process when ``open_clip`` is importable (same loss, optimizer, autocast).
Each reports samples/s (median of CUDA-event step times after warm-up) and peak memory.
End to end: ``mmtrain run contrastive --config clip_vit_b16`` on an image folder (``--data DIR``, or generated JPEGs),
reporting the recipe's own samples/s after its first logging window, so step-only vs end-to-end shows what the
loader costs.

    mmtrain bench contrastive [--batch 256] [--steps 10] [--data DIR] [--no-e2e | --e2e-only] [--out bench_results/contrastive.json]
    mmtrain bench contrastive --smoke      # tiny CPU run (tests use it)

Shapes: pixel_values (B, 3, 224, 224), input_ids / attention_mask (B, 77) -> loss ().
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtrain.bench._report import print_and_write, ratio_to
from mmtrain.bench._timing import measure_variant, step_bench_parser, time_steps

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = step_bench_parser("contrastive", __doc__, batch=256,
                          smoke_help="tiny CLIP on CPU, 2 steps, tiny end-to-end run (tests)",
                          compile_help="skip the compiled variant")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seq-len", type=int, default=77)
    p.add_argument("--no-open-clip", action="store_true", help="skip open_clip even if importable")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end recipe run")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end recipe runs (no step-only variants)")
    p.add_argument("--data", default=None, help="image folder for the end-to-end run (default: generated JPEGs)")
    p.add_argument("--e2e-steps", type=int, default=30, help="recipe steps in the end-to-end run")
    p.add_argument("--num-workers", type=int, default=8, help="DataLoader workers in the end-to-end run")
    p.add_argument("--e2e-variant", action="append", default=[], metavar="OVERRIDES",
                   help="one more end-to-end run with these space-separated recipe overrides, on the same data, "
                        "to measure one lever, e.g. 'host_sync=step' (repeatable)")
    return p.parse_args(argv)


def _build_mmtrain(args: argparse.Namespace) -> nn.Module:
    from mmtrain.models.clip._dual_builders import clip_tiny, clip_vit_b16

    torch.manual_seed(0)
    if args.smoke:
        return clip_tiny(vocab_size=1000, image_size=args.image_size, context_length=args.seq_len)
    return clip_vit_b16(vocab_size=49408, context_length=args.seq_len, image_size=args.image_size)


def _batch(args: argparse.Namespace, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq_len // 4, args.seq_len + 1, (args.batch,), generator=gen)
    mask = (torch.arange(args.seq_len)[None] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (args.batch, args.seq_len), generator=gen) * mask
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    return {"pixel_values": pixels.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _run_variant(name: str, build: Callable[[], tuple[nn.Module, Callable[[dict], torch.Tensor]]],
                 args: argparse.Namespace, device: torch.device, vocab: int) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        model, loss_of = build()
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2, fused=device.type == "cuda")
        batch = _batch(args, vocab, device)

        def one_step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_of(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        times = time_steps(one_step, warmup=args.warmup, steps=args.steps, device=device)
    except torch.cuda.OutOfMemoryError:
        return {"name": name, "error": "out of memory"}
    step_s = statistics.median(times)
    result = {"name": name, "step_s": step_s, "samples_per_s": args.batch / step_s,
              "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _variants(args: argparse.Namespace) -> tuple[list[tuple[str, Callable]], str | None]:
    from mmtrain.losses import ClipLoss

    def mmtrain_variant(compiled: bool, regional: bool = False) -> Callable:
        def build() -> tuple[nn.Module, Callable]:
            model = _build_mmtrain(args)
            if regional:
                from mmtrain.training.distributed import compile_model

                compile_model(model, "regional", dynamic=False)  # as the contrastive recipe compiles it
            loss_fn = ClipLoss(gather=False)

            def loss_of(batch: dict) -> torch.Tensor:
                image = model.encode_image(batch["pixel_values"])
                text = model.encode_text(batch["input_ids"], batch["attention_mask"])
                return loss_fn(image, text, model.get_logit_scale(), model.get_logit_bias())

            return model, (torch.compile(loss_of) if compiled else loss_of)

        return build

    variants: list[tuple[str, Callable]] = [("mmtrain", mmtrain_variant(False))]
    if not args.no_compile:
        variants.append(("mmtrain_compiled", mmtrain_variant(True)))
        # What the recipe's default compile (regional: each layer) gives, for reading the end-to-end figure.
        variants.append(("mmtrain_regional", mmtrain_variant(False, regional=True)))
    note = None
    if not args.no_open_clip and not args.smoke:
        try:
            import open_clip

            def build_open_clip() -> tuple[nn.Module, Callable]:
                torch.manual_seed(0)
                model = open_clip.create_model("ViT-B-16", pretrained=None)
                loss_fn = ClipLoss(gather=False)

                def loss_of(batch: dict) -> torch.Tensor:
                    image = model.encode_image(batch["pixel_values"], normalize=True)
                    text = model.encode_text(batch["input_ids"], normalize=True)
                    return loss_fn(image, text, model.logit_scale.exp().clamp(max=100))

                return model, loss_of

            variants.append(("open_clip", build_open_clip))
        except ImportError as err:
            note = f"open_clip not importable: {err}"
    return variants, note


# ------------------------------------------------------------------------------------------------- end to end


def _write_jpeg_folder(root: Path, train: int, validation: int, size: int) -> None:
    """An imagefolder-convention dataset of random-coloured JPEGs with short captions."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for split, count in (("train", train), ("validation", validation)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
            name = f"{i:06d}.jpg"
            Image.fromarray(pixels).save(folder / name, quality=90)
            lines.append(json.dumps({"file_name": name, "text": f"a photo of something {colours[i % 6]}"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _load_recipe_main() -> Callable:
    from mmtrain.config import resolve_recipe

    path = resolve_recipe("contrastive")
    spec = importlib.util.spec_from_file_location("mmtrain_bench_contrastive_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _end_to_end_runs(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The default recipe run, then one per ``--e2e-variant``, all on one data folder."""
    with tempfile.TemporaryDirectory(prefix="mmtrain_bench_data_") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            samples = args.batch * (args.e2e_steps + 1)
            _write_jpeg_folder(data, samples, max(args.batch // 4, 4), 32 if args.smoke else 256)
        results = []
        for extra in [""] + list(args.e2e_variant):
            name = "recipe_end_to_end" + (f" [{extra}]" if extra else "")
            results.append(measure_variant(name, partial(_end_to_end, name, args, device, data, extra.split())))
        return results


def _end_to_end(name: str, args: argparse.Namespace, device: torch.device, data: Path,
                extra: list[str]) -> dict[str, Any]:
    from mmtrain.config import load

    with tempfile.TemporaryDirectory(prefix="mmtrain_bench_e2e_") as tmp:
        steps = args.e2e_steps
        log_every = max(steps // 3, 1)
        overrides = [
            "dataset=image_folder", f"dataset.path={data}", f"dataset.image_size={args.image_size}",
            f"batch_size={args.batch}", f"max_steps={steps}", f"output_dir={Path(tmp) / 'run'}", "resume=none",
            f"log.every_n_steps={log_every}", f"eval.every_n_steps={10 * steps}",
            f"checkpoint.every_n_steps={10 * steps}", f"num_workers={args.num_workers}", f"device={device.type}",
        ]
        if args.smoke:
            overrides += ["model=clip_tiny", "model.vocab_size=30522", f"model.image_size={args.image_size}",
                          "compile=false", "distributed.strategy=none", "eval.batch_size=8"]
        # Throughput does not depend on the vocabulary: the built-in word-level tokenizer at CLIP's 77-token
        # context avoids needing the MiniLM package on the GPU machine.
        overrides += ["tokenizer=shapes", f"tokenizer.max_length={16 if args.smoke else 77}"]
        cfg = load("contrastive", "clip_vit_b16", overrides + extra)
        start = time.perf_counter()
        _load_recipe_main()(cfg)
        wall_s = time.perf_counter() - start
        events = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        windows = [e["samples_per_s"] for e in events if "samples_per_s" in e]
        # The first window holds compilation and loader start-up; report the steady state after it.
        steady = windows[1:] or windows
        result = {"name": name, "steps": steps, "overrides": extra, "wall_s": wall_s,
                  "samples_per_s": statistics.median(steady) if steady else float("nan"),
                  "data": str(args.data) if args.data else "generated JPEGs"}
        waits = [e["data_wait"] for e in events if "data_wait" in e][1:]
        if waits:
            result["data_wait"] = statistics.median(waits)  # > 0: the step waited for the loader
        peaks = [e["peak_mem_gib"] for e in events if "peak_mem_gib" in e]
        if peaks:
            result["peak_memory_gib"] = max(peaks)
        return result


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.smoke:
        args.batch, args.steps, args.warmup = min(args.batch, 4), 2, 1
        args.image_size, args.seq_len, args.no_compile = 32, 16, True
        args.e2e_steps, args.num_workers = 2, 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vocab = 1000 if args.smoke else 49408
    variants, note = _variants(args)
    if args.e2e_only:
        variants = []
    results = []
    for name, build in variants:
        results.append(measure_variant(name, partial(_run_variant, name, build, args, device, vocab)))
    if not args.no_e2e:
        results += _end_to_end_runs(args, device)
    report: dict[str, Any] = {
        "benchmark": "clip_vit_b16_train_step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "image_size": args.image_size,
        "seq_len": args.seq_len,
        "smoke": args.smoke,
        "results": results,
    }
    if note:
        report["open_clip"] = note
    speedup = ratio_to(results, "open_clip")
    if speedup is not None:
        report["speedup_vs_open_clip"] = speedup
    end_to_end = ratio_to(results, "recipe_end_to_end")
    if end_to_end is not None:
        report["end_to_end_over_step_only"] = 1.0 / end_to_end
    print_and_write(results, report, args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
