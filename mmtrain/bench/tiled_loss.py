"""Benchmark: memory and time of the contrastive losses' tiled form (loss + backward) at a 65,536 global batch.

For AlignLoss, ClipLoss and SigLipLoss (``mmtrain.losses``, ``gather=False``) with ``tiled=True`` and, where the
logit matrix fits (``--plain-max-logits-gib``), the plain form: random L2-normalized embeddings
image_embeds, text_embeds (B, D) in bf16 or fp32 (leaf tensors with gradients), a learnable logit scale (and
SigLIP bias) -> loss () -> backward. Reports per variant:

* ``peak_beyond_embeddings_gib``: peak memory of one loss + backward minus what was allocated before it (the
  embeddings) and minus the bytes of the embeddings' gradients. CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``; CPU (``--smoke``): a dispatch-mode tracker that sums the storages every op
  allocates while they are alive.
* ``step_s``: median loss + backward time (CUDA events after warm-up; ``perf_counter`` on CPU).
* ``within_target``: tiled peak <= ``--target-gib`` (the issue's 4 GiB beyond the embeddings at 65,536 x 640).
* plain rows carry ``vs_tiled``: loss and gradient differences between the two forms on the same inputs.

    mmtrain bench tiled_loss [--batch 65536] [--dim 640] [--dtype bf16 fp32] [--block-size 1024]
                             [--loss align clip siglip] [--out bench_results/tiled_loss.json]
    mmtrain bench tiled_loss --smoke      # CPU, batch 256, dim 16: tiled and plain agree, JSON written (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmtrain.bench._timing import time_steps
from mmtrain.errors import UserError
from mmtrain.losses import AlignLoss, ClipLoss, SigLipLoss

__all__ = ["main"]

LOSSES = {"align": AlignLoss, "clip": ClipLoss, "siglip": SigLipLoss}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Largest relative difference between tiled and plain loss/gradients accepted as "agree". bf16 inputs: the two
# forms round their matmul products to bf16 at different points, so bf16's resolution (2^-8) bounds the difference.
AGREEMENT_TOL = {"fp32": 1e-4, "bf16": 2e-2}
GIB = 2**30


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmtrain bench tiled_loss", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, batch 256, dim 16, block 64; checks tiled == plain")
    p.add_argument("--out", default="bench_results/tiled_loss.json", help="JSON results file")
    p.add_argument("--batch", type=int, default=65536, help="global batch (rows of each embedding matrix)")
    p.add_argument("--dim", type=int, default=640, help="embedding width")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"], help="embedding dtypes")
    p.add_argument("--loss", nargs="+", choices=sorted(LOSSES), default=["align", "clip", "siglip"])
    p.add_argument("--block-size", type=int, nargs="+", default=[1024],
                   help="the losses' block_size (columns per tile); several values sweep it")
    p.add_argument("--plain-max-logits-gib", type=float, default=2.0,
                   help="run the plain form only when one fp32 B x B logit matrix is at most this size")
    p.add_argument("--target-gib", type=float, default=4.0, help="pass/fail bound on the tiled peak")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-tf32", action="store_true", help="full-precision fp32 matmuls on CUDA (default: TF32)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.dim, args.block_size, args.steps, args.warmup = 256, 16, [64], 2, 1
    if min(args.batch, args.dim, *args.block_size, args.steps) < 1 or args.warmup < 0:
        raise UserError("tiled_loss: --batch, --dim, --block-size and --steps must be >= 1, --warmup >= 0")
    return args


class _LiveStorageTracker(TorchDispatchMode):
    """CPU stand-in for ``torch.cuda.max_memory_allocated``: every storage an op creates counts from its creation
    until it is freed (weakref finalizer); ``peak`` is the largest sum seen. Storages that existed before the mode
    was entered are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self.live:  # views and in-place results share a storage already counted
                self.live[key] = nbytes
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._release, key, nbytes)
        return out


def _embeddings(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(2):
        x = F.normalize(torch.randn(args.batch, args.dim, generator=generator), dim=1)
        out.append(x.to(device=device, dtype=dtype).requires_grad_())
    return out


def _step_fn(loss_name: str, tiled: bool, block: int, image: torch.Tensor, text: torch.Tensor
             ) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """A loss + backward closure and the leaves that get gradients (image, text, scale[, bias])."""
    device = image.device
    loss_fn = LOSSES[loss_name](gather=False, tiled=tiled, block_size=block).to(device)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)  # CLIP's initial logit scale
    bias = torch.tensor(-10.0, device=device, requires_grad=True) if loss_name == "siglip" else None
    leaves = [image, text, scale] + ([bias] if bias is not None else [])

    def step() -> torch.Tensor:
        for leaf in leaves:
            leaf.grad = None
        loss = loss_fn(image, text, scale, bias)
        loss.backward()
        return loss.detach()

    return step, leaves


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(name: str, loss_name: str, tiled: bool, block: int, dtype_name: str, image: torch.Tensor,
             text: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    device = image.device
    result: dict[str, Any] = {"name": name, "loss": loss_name, "form": "tiled" if tiled else "plain",
                              "dtype": dtype_name, "block_size": block if tiled else None}
    step, leaves = _step_fn(loss_name, tiled, block, image, text)
    grad_bytes = 2 * image.numel() * image.element_size()  # the embeddings' gradients, same dtype
    try:
        for _ in range(args.warmup):
            step()
        for leaf in leaves:
            leaf.grad = None
        gc.collect()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            value = step()
            _sync(device)
            peak = torch.cuda.max_memory_allocated() - before
            result["peak_total_gib"] = torch.cuda.max_memory_allocated() / GIB
        else:
            with _LiveStorageTracker() as tracker:
                value = step()
            peak = tracker.peak
        result["loss_value"] = value.item()
        result["peak_beyond_embeddings_gib"] = (peak - grad_bytes) / GIB
        result["step_s"] = statistics.median(time_steps(step, warmup=0, steps=args.steps, device=device))
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
    finally:
        for leaf in leaves:
            leaf.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if tiled and "peak_beyond_embeddings_gib" in result:
        result["within_target"] = result["peak_beyond_embeddings_gib"] <= args.target_gib
    return result


def _agreement(loss_name: str, block: int, dtype_name: str, image: torch.Tensor, text: torch.Tensor
               ) -> dict[str, Any]:
    """Tiled vs plain on the same inputs: relative differences of the loss and of every gradient."""
    outputs = []
    for tiled in (True, False):
        step, leaves = _step_fn(loss_name, tiled, block, image, text)
        loss = step()
        outputs.append((loss.float(), [leaf.grad.float().clone() for leaf in leaves]))
        for leaf in leaves:
            leaf.grad = None
    (tiled_loss, tiled_grads), (plain_loss, plain_grads) = outputs
    loss_rel = ((tiled_loss - plain_loss).abs() / plain_loss.abs().clamp_min(1.0)).item()
    grad_rel = max(((t - p).abs().max() / p.abs().max().clamp_min(1e-12)).item()
                   for t, p in zip(tiled_grads, plain_grads))
    tol = AGREEMENT_TOL[dtype_name]
    return {"loss_rel_diff": loss_rel, "grad_max_rel_diff": grad_rel, "tolerance": tol,
            "agree": loss_rel <= tol and grad_rel <= tol}


def _print_table(results: list[dict[str, Any]], target_gib: float) -> None:
    print(f"{'variant':<26} {'step ms':>9} {'peak GiB':>9} {f'<= {target_gib:g} GiB':>10}  note")
    for r in results:
        step_ms = f"{r['step_s'] * 1000:.1f}" if "step_s" in r else "-"
        peak = f"{r['peak_beyond_embeddings_gib']:.3f}" if "peak_beyond_embeddings_gib" in r else "-"
        verdict = {True: "PASS", False: "FAIL"}.get(r.get("within_target"), "-")
        note = r.get("error") or r.get("skipped") or ""
        if "vs_tiled" in r:
            v = r["vs_tiled"]
            note = (f"vs tiled: loss {v['loss_rel_diff']:.1e}, grads {v['grad_max_rel_diff']:.1e} "
                    f"({'agree' if v['agree'] else 'DISAGREE'})")
        print(f"{r['name']:<26} {step_ms:>9} {peak:>9} {verdict:>10}  {note}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke and args.batch > 8192:
        raise UserError(f"tiled_loss: no CUDA device, and --batch {args.batch} on CPU would take hours; "
                        "pass --smoke or --batch <= 8192")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    logits_gib = args.batch**2 * 4 / GIB
    run_plain = logits_gib <= args.plain_max_logits_gib
    sweep = len(args.block_size) > 1
    results: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        results.append(row)
        print(json.dumps(row), flush=True)  # one line as each variant lands: a run cut off still reports

    for dtype_name in args.dtype:
        image, text = _embeddings(args, DTYPES[dtype_name], device)
        for loss_name in args.loss:
            for block in args.block_size:
                suffix = f"_b{block}" if sweep else ""
                emit(_measure(f"{loss_name}_tiled_{dtype_name}{suffix}", loss_name, True, block, dtype_name,
                              image, text, args))
            name = f"{loss_name}_plain_{dtype_name}"
            if not run_plain:
                emit({"name": name, "loss": loss_name, "form": "plain", "dtype": dtype_name,
                      "skipped": f"{args.batch:,}^2 fp32 logits = {logits_gib:.1f} GiB > "
                                 f"--plain-max-logits-gib {args.plain_max_logits_gib:g}"})
                continue
            row = _measure(name, loss_name, False, args.block_size[0], dtype_name, image, text, args)
            if "error" not in row:
                row["vs_tiled"] = _agreement(loss_name, args.block_size[0], dtype_name, image, text)
            emit(row)
        del image, text
        gc.collect()

    report = {
        "benchmark": "tiled_loss",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "dim": args.dim,
        "block_sizes": args.block_size,
        "dtypes": args.dtype,
        "target_gib": args.target_gib,
        "tf32": device.type == "cuda" and not args.no_tf32,
        "memory_source": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "live-storage tracker (CPU)",
        "smoke": args.smoke,
        "results": results,
    }
    _print_table(results, args.target_gib)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    disagree = [r["name"] for r in results if not r.get("vs_tiled", {"agree": True})["agree"]]
    if disagree:
        print(f"tiled and plain disagree: {', '.join(disagree)}", flush=True)
    return 1 if disagree else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
