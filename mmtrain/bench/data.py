"""Data benchmark: JPEG image folder -> augmented 224 px contrastive batches, images/s.

    mmtrain bench data [--path DIR] [--num-workers 8] [--batch-size 256] [--no-persistent-workers]
                       [--out bench_results/data.json]

Paths measured (each a row of the table and an entry of the JSON):
- ``cpu``: the training loader as the recipe builds it (``image_folder`` + ``build_contrastive_loader``): PIL
  decode, torchvision v2 random resized crop + caption-aware flip + normalize in DataLoader workers, tokenized
  batches, pinned memory when CUDA is present, float pixels copied to the training device (CUDA, else CPU).
- ``cpu_uint8``: the same with the recipe's ``normalize_on_device``: workers hand over uint8 pixels (a quarter
  of the bytes through shared memory, pinning and the copy), normalized once on the device.
- ``decode_on_device``: the recipe's ``decode_on_device=true`` loader: workers read JPEG bytes and draw crops,
  ``loader.device_decoder`` decodes (nvJPEG on CUDA), crops and flips on the device (on CPU without CUDA). It
  replaces the ``gpu`` path of earlier runs, a benchmark-only loop doing the same on CUDA.

Without ``--path`` a temporary folder of random-content JPEGs (``--num-images`` at ``--source-size``) is written
first. ``--smoke`` is a tiny CPU run for tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmtrain bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="imagefolder dataset (default: a generated JPEG folder)")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--source-size", type=int, default=384, help="side of generated JPEGs")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--num-batches", type=int, default=20, help="timed batches (after one warm-up batch)")
    parser.add_argument("--paths", default="cpu,cpu_uint8,decode_on_device",
                        help="comma list of cpu,cpu_uint8,decode_on_device")
    parser.add_argument("--no-draft-decode", action="store_true",
                        help="decode JPEGs at full size (default: reduced-scale decode where the crop allows)")
    parser.add_argument("--no-persistent-workers", action="store_true",
                        help="start the workers again at each epoch (the loader's default keeps them)")
    parser.add_argument("--out", default="bench_results/data.json")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.source_size, args.image_size = 24, 48, 32
        args.batch_size, args.num_workers, args.num_batches, args.paths = 8, 0, 2, "cpu,cpu_uint8,decode_on_device"
    return args


def write_jpeg_folder(root: Path, num_images: int, size: int, seed: int = 0) -> Path:
    """Random smooth-noise JPEGs with short captions, in the imagefolder layout (train/ and validation/)."""
    from PIL import Image

    from mmtrain.data.image_folder import write_image_folder

    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "dog", "cat", "car", "tree", "on", "a", "beach", "left", "of", "the"]

    def sample(i):
        low = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR)  # compressible like a photo
        return image, " ".join(rng.choice(words, 6))

    write_image_folder(root, [sample(i) for i in range(num_images)], split="train", fmt="JPEG")
    write_image_folder(root, [sample(i) for i in range(max(2, num_images // 16))], split="validation", fmt="JPEG")
    return root


def _time_batches(iterator, num_batches: int, sync) -> tuple[float, int]:
    next(iterator)  # warm-up: worker start, first decode
    sync()
    start, images = time.perf_counter(), 0
    for _ in range(num_batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        images += int(batch["pixel_values"].shape[0])
    sync()
    return time.perf_counter() - start, images


def bench_cpu(path: str, args, normalize_on_device: bool = False, decode_on_device: bool = False) -> dict:
    from mmtrain.data.image_folder import image_folder_dataset
    from mmtrain.data.loader import build_contrastive_loader
    from mmtrain.data.tokenizers import shapes_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = image_folder_dataset("train", path=path, image_size=args.image_size,
                                   transform={"scale": [0.35, 1.0]}, draft_decode=not args.no_draft_decode)
    loader = build_contrastive_loader(
        dataset, shapes_tokenizer(16), batch_size=args.batch_size, shuffle=True, seed=0,
        num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
        normalize_on_device=normalize_on_device, decode_on_device=device if decode_on_device else None,
        persistent_workers=not args.no_persistent_workers,
    )

    def on_device():
        # what the recipe's step receives: float pixels on the training device
        while True:
            for batch in loader:
                if loader.device_decoder is not None:
                    batch = loader.device_decoder(batch)
                pixels = batch["pixel_values"].to(device, non_blocking=True)
                if loader.pixel_normalizer is not None:
                    pixels = loader.pixel_normalizer(pixels)
                yield {"pixel_values": pixels, "input_ids": batch["input_ids"].to(device, non_blocking=True)}

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds, images = _time_batches(on_device(), args.num_batches, sync)
    name = "decode_on_device" if decode_on_device else "cpu_uint8" if normalize_on_device else "cpu"
    return {"path": name, "images": images, "seconds": seconds,
            "images_per_s": images / seconds, "num_workers": args.num_workers,
            "draft_decode": not args.no_draft_decode, "persistent_workers": not args.no_persistent_workers}


def main(argv: list[str] | None = None) -> int:
    # Worker batches travel through shared-memory files, not passed file descriptors: the GPU machine's
    # descriptor passing failed with EBADF under many workers.
    torch.multiprocessing.set_sharing_strategy("file_system")
    args = _parse(argv)
    workdir = None
    path = args.path
    if path is None:
        workdir = Path(tempfile.mkdtemp(prefix="mmtrain-bench-data-"))
        path = str(write_jpeg_folder(workdir, args.num_images, args.source_size))
    try:
        results = []
        wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
        for name in ("cpu", "cpu_uint8", "decode_on_device"):
            if name in wanted:
                results.append(bench_cpu(path, args, normalize_on_device=name != "cpu",
                                         decode_on_device=name == "decode_on_device"))
                print(json.dumps(results[-1]), flush=True)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "benchmark": "data", "image_size": args.image_size, "batch_size": args.batch_size,
        "source": args.path or f"generated {args.num_images} JPEGs at {args.source_size}px",
        "torch": torch.__version__, "results": results,
    }
    print(f"{'path':<16} {'workers':>7} {'images':>7} {'seconds':>8} {'images/s':>10}")
    for r in results:
        print(f"{r['path']:<16} {r['num_workers']:>7} {r['images']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>10.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
