"""JPEG decode and augmentation on the training device: DataLoader workers only read file bytes and draw each
sample's crop, so that a CPU-starved loader need not limit the step (the ``decode_on_device`` recipe key).

Worker item (``EncodedImageDataset[index]``), one of:

    {"encoded": uint8 (n_bytes,), "crop": long (4,) top/left/height/width, "flip": bool, "text", "index"}
    {"pixel_values": uint8 (3, S, S), "text", "index"}   a file the device path does not take (PNG, CMYK or
                                                         EXIF-rotated JPEG...), decoded and cropped on the CPU
    None                                                 unreadable (skipped and counted by the CPU path)

Batch (``EncodedCollator``): ``encoded`` uint8 (total bytes,) the n_enc files back to back, ``encoded_lengths``
long (n_enc,), ``crops`` long (n_enc, 4), ``flips`` bool (n_enc,), ``encoded_positions`` long (n_enc,),
``cpu_pixels`` uint8 (n_cpu, 3, S, S), ``cpu_positions`` long (n_cpu,), plus the usual ``input_ids`` (B, L),
``attention_mask`` (B, L), ``index`` (B,), ``num_skipped`` ().

``DeviceImageDecoder(batch)`` turns that into the plain contract: ``pixel_values`` uint8 (B', 3, S, S) on the
device (``torchvision.io.decode_jpeg``, nvJPEG on CUDA), then the loader's ``pixel_normalizer`` gives floats. A
file that fails to decode there is dropped from the batch (its text rows too) and counted in ``num_skipped``.

On CUDA the crops are resized together (``mmtrain.data.batched_resize``: two matmuls for the batch, within a level of
torch's uint8 kernel) because a per-image resize call costs the host more than the device; elsewhere each crop goes
through torchvision's ``resized_crop``, exactly as in the workers. nvJPEG's batched decode runs on a stream of its
own: its hardware engine may write its output before work queued on the stream it is given has run, so on the
training stream it could overwrite memory the queued step still reads (NaN gradients; pytorch/vision#9606).

Crops and flips come from the same per-sample seed and the same draws as ``ContrastiveImageTransform``, so the
device path crops exactly the regions the CPU path would (pixels differ only by the JPEG decoders' rounding).
"""

from __future__ import annotations

import io
import logging
import random
import warnings
from typing import Any

import torch
from PIL import Image

from mmtrain.data.loader import ContrastiveCollator, TransformedDataset, _mix, split_sample_key
from mmtrain.errors import ConfigError, DataError

__all__ = ["DeviceImageDecoder", "EncodedCollator", "EncodedImageDataset"]

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112


class EncodedImageDataset(TransformedDataset):
    """An image folder's rows as encoded JPEG bytes plus the crop and flip the train transform would draw."""

    def __init__(self, dataset, image_transform, seed: int = 0) -> None:
        if not hasattr(dataset, "_source_of"):
            raise ConfigError(f"decode_on_device: needs an image folder dataset (dataset=image_folder), got "
                              f"{type(dataset).__name__}")
        if not getattr(image_transform, "train", False):
            raise ConfigError("decode_on_device: applies to the training transform only")
        super().__init__(dataset, image_transform, seed=seed)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        epoch, index = split_sample_key(key, self.epoch)
        source, _ = self.dataset._source_of(index)
        text = self.dataset.captions[index]
        seed = _mix(self.seed, epoch, index)
        try:
            data = None if isinstance(source, Image.Image) else _read_bytes(source)
            header = None if data is None else _jpeg_header(data, getattr(self.dataset, "max_image_pixels", None))
        except Exception:  # noqa: BLE001 - unreadable here: the CPU path decides (it skips and counts what fails)
            header = None
        if header is None:  # not a plain RGB/grayscale JPEG: the CPU path decodes it
            item = super().__getitem__((epoch, index))
            return None if item is None else {"pixel_values": item["pixel_values"], "text": text, "index": index}
        width, height = header
        transform = self.image_transform
        rng = random.Random(seed)
        crop = transform.crop_params(height, width, rng)
        flip = rng.random() < transform.hflip_prob and transform.flip_allowed(text)
        return {"encoded": torch.frombuffer(bytearray(data), dtype=torch.uint8), "crop": torch.tensor(crop),
                "flip": flip, "text": text, "index": index}


def _read_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    with open(source, "rb") as handle:
        return handle.read()


def _jpeg_header(data: bytes, max_image_pixels: int | None) -> tuple[int, int] | None:
    """(width, height) of a JPEG the device decoder takes as is, None for any other image; raises if unreadable
    or over the pixel limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if max_image_pixels and image.width * image.height > max_image_pixels:
            raise Image.DecompressionBombError(
                f"{image.width}x{image.height} = {image.width * image.height} pixels exceeds {max_image_pixels}")
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # rotation is applied on the CPU path
            return None
        return image.width, image.height


class EncodedCollator(ContrastiveCollator):
    """Packs encoded images back to back in one uint8 tensor, CPU-decoded ones in one uint8 stack.

    One tensor, not one per file: each tensor leaving a worker is its own shared-memory segment (and its own pinned
    copy), a cost per file that held the loader to about 1300 images/s on an H100 host.
    """

    def __call__(self, samples: list[dict | None]) -> dict[str, Any]:
        kept = [s for s in samples if s is not None]
        num_skipped = torch.tensor(len(samples) - len(kept), dtype=torch.long)
        if not kept:
            return {"pixel_values": None, "index": torch.zeros(0, dtype=torch.long), "num_skipped": num_skipped}
        tokens = self.tokenizer([s["text"] for s in kept])
        encoded = [(i, s) for i, s in enumerate(kept) if "encoded" in s]
        decoded = [(i, s) for i, s in enumerate(kept) if "encoded" not in s]
        return {
            "encoded": torch.cat([s["encoded"] for _, s in encoded]) if encoded else torch.zeros(0, dtype=torch.uint8),
            "encoded_lengths": torch.tensor([s["encoded"].numel() for _, s in encoded], dtype=torch.long),
            "crops": torch.stack([s["crop"] for _, s in encoded]) if encoded else torch.zeros(0, 4, dtype=torch.long),
            "flips": torch.tensor([s["flip"] for _, s in encoded], dtype=torch.bool),
            "encoded_positions": torch.tensor([i for i, _ in encoded], dtype=torch.long),
            "cpu_pixels": torch.stack([s["pixel_values"] for _, s in decoded]) if decoded else None,
            "cpu_positions": torch.tensor([i for i, _ in decoded], dtype=torch.long),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
            "num_skipped": num_skipped,
        }


class DeviceImageDecoder:
    """Host batch from ``EncodedCollator`` -> the same batch with ``pixel_values`` uint8 (B', 3, S, S) on ``device``.

    ``batched``: resize all crops of a batch together (default: on CUDA); else one ``resized_crop`` per image.
    """

    # Crops resized per matmul: bounds the float32 copies (a chunk of 64 crops of 1024 x 1024 pixels is 0.8 GB).
    chunk = 64

    def __init__(self, image_size: int, interpolation, device: torch.device | str, batched: bool | None = None) -> None:
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.device = torch.device(device)
        self.batched = self.device.type == "cuda" if batched is None else bool(batched)
        self._decode_stream = None

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if not encoded:
            return []
        if self.device.type != "cuda":
            return self._decode_all(encoded)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        training_stream = torch.cuda.current_stream(self.device)
        # No wait on the training stream: the decoder reads host bytes, and on a stream of its own the allocator
        # only hands it blocks no queued kernel still uses (record_stream below keeps ours from being reused early).
        with torch.cuda.stream(self._decode_stream):
            images = self._decode_all(encoded)
        training_stream.wait_stream(self._decode_stream)
        for image in images:
            if image is not None:
                image.record_stream(training_stream)
        return images

    def _decode_all(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the whole batched call: find it, keep the others
            images: list[torch.Tensor | None] = []
            for data in encoded:
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as error:
                    logger.warning("skipping a JPEG the device decoder cannot read: %s", error)
                    images.append(None)
            return images

    def _augment_batch(self, images: list[torch.Tensor], crops: list[list[int]],
                       flips: list[bool]) -> list[torch.Tensor]:
        from mmtrain.data.batched_resize import batched_resized_crop

        cropped = [image[:, top:top + height, left:left + width] for image, (top, left, height, width)
                   in zip(images, crops)]
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # TF32 would move sums of 255-level pixels by a level or more
        try:
            out: list[torch.Tensor] = []
            for start in range(0, len(cropped), self.chunk):
                stop = start + self.chunk
                out.extend(batched_resized_crop(cropped[start:stop], self.image_size, flips[start:stop],
                                                self.interpolation).unbind(0))
            return out
        finally:
            torch.set_float32_matmul_precision(precision)

    def _augment(self, image: torch.Tensor, crop: list[int], flip: bool) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        top, left, height, width = crop
        size = self.image_size
        if not ((height, width) == tuple(image.shape[-2:]) == (size, size)):
            image = F.resized_crop(image, top, left, height, width, [size, size], interpolation=self.interpolation,
                                   antialias=True)
        return F.horizontal_flip(image) if flip else image

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "encoded" not in batch:
            return batch
        batch = dict(batch)
        encoded = list(batch.pop("encoded").split(batch.pop("encoded_lengths").tolist()))
        crops, flips = batch.pop("crops").tolist(), batch.pop("flips").tolist()
        encoded_positions, cpu_positions = batch.pop("encoded_positions").tolist(), batch.pop("cpu_positions").tolist()
        cpu_pixels = batch.pop("cpu_pixels")
        count = len(encoded_positions) + len(cpu_positions)
        images: list[torch.Tensor | None] = [None] * count
        decoded = [(position, image, crop, flip) for position, image, crop, flip
                   in zip(encoded_positions, self._decode(encoded), crops, flips) if image is not None]
        if self.batched and decoded:
            positions, found, found_crops, found_flips = zip(*decoded)
            for position, image in zip(positions, self._augment_batch(list(found), list(found_crops),
                                                                       list(found_flips))):
                images[position] = image
        else:
            for position, image, crop, flip in decoded:
                images[position] = self._augment(image, crop, flip)
        if cpu_pixels is not None:
            on_device = cpu_pixels.to(self.device, non_blocking=True)
            for row, position in enumerate(cpu_positions):
                images[position] = on_device[row]
        keep = [i for i, image in enumerate(images) if image is not None]
        if len(keep) < count:
            rows = torch.tensor(keep, dtype=torch.long)
            for key in ("input_ids", "attention_mask", "index"):
                batch[key] = batch[key].index_select(0, rows)
            batch["num_skipped"] = batch["num_skipped"] + (count - len(keep))
        if not keep:
            raise DataError(f"none of the {count} images of a batch could be decoded on {self.device} "
                            "(decode_on_device=false decodes them on the CPU)")
        batch["pixel_values"] = torch.stack([images[i] for i in keep])
        return batch
