"""Local image-text datasets: the ``datasets`` imagefolder layout, or a ``datasets.save_to_disk`` folder.

    DIR/train/metadata.jsonl        {"file_name": "0001.jpg", "text": "a dog on a beach"} per line
    DIR/train/0001.jpg ...
    DIR/validation/...              optional: carved from train (seeded) when absent

Items are ``{"image": PIL RGB, "text": str, "index": int}``, or None for an image that cannot be decoded
(corrupt, truncated, over the pixel limit): the loader drops it and counts it in the batch's ``num_skipped``.

Rules for bad input (each a one-line DataError naming the place): missing folder; missing, empty or malformed
metadata (file:line); a line that is not UTF-8, or an empty caption (file:line); an image file that does not
exist or escapes the split folder (file:line); no readable image at all. Overlong captions are not an error:
the tokenizer truncates them. Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images become
8-bit RGB.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from mmtrain.errors import DataError

logger = logging.getLogger("mmtrain.data")

METADATA = "metadata.jsonl"
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
# Decoded images beyond this many are logged by name; after that only counted.
_MAX_LOGGED_SKIPS = 10


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16/32-bit and float scaled to 8 bits, transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image).astype(np.float64)
        if image.mode == "F":
            peak = 1.0 if values.size and values.max() <= 1.0 else 255.0
            values = values * (255.0 / peak)
        elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
            values = values / 257.0  # 16-bit range -> 8-bit range
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(source: str | bytes | os.PathLike, max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS,
                 min_side: int | None = None) -> Image.Image:
    """File path or encoded bytes -> RGB PIL image. Raises on anything unreadable (the caller counts it).

    The pixel limit is checked from the header, before any pixel is decoded: a decompression bomb costs
    nothing but the header read. ``min_side``: a JPEG whose shorter side is at least twice that is decoded at
    1/2, 1/4 or 1/8 scale in the DCT domain (PIL's draft mode), the largest reduction that keeps the shorter
    side >= ``min_side``: a 1024 px photo for a 224 px crop decodes several times faster.
    """
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")  # noqa: SIM115
    with handle, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(handle)
        if max_image_pixels and image.width * image.height > max_image_pixels:
            raise Image.DecompressionBombError(
                f"{image.width}x{image.height} = {image.width * image.height} pixels exceeds {max_image_pixels}"
            )
        if min_side and image.format == "JPEG" and min(image.size) >= 2 * min_side:
            scale = min(image.size) / min_side
            image.draft("RGB", (math.ceil(image.width / scale), math.ceil(image.height / scale)))
        if ImageFile.LOAD_TRUNCATED_IMAGES:  # another library flipped the global: we still refuse truncated files
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        image.load()
        # In place: the default returns a copy of the whole frame even when the orientation needs no change.
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)


def read_metadata(split_dir: Path, text_column: str = "text") -> tuple[list[str], list[str]]:
    """Validated (file paths, captions) of one imagefolder split, in metadata order."""
    metadata = split_dir / METADATA
    if not metadata.is_file():
        raise DataError(f"{split_dir}: no {METADATA} (one JSON object per line with file_name and {text_column})")
    root = split_dir.resolve()
    files, texts = [], []
    with open(metadata, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{metadata}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not valid UTF-8 (byte {error.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            name, text = row.get("file_name"), row.get(text_column)
            if not isinstance(name, str) or not name:
                raise DataError(f"{where}: missing or non-string 'file_name'")
            if not isinstance(text, str):
                raise DataError(f"{where}: missing or non-string {text_column!r}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{where}: caption is not valid UTF-8 (lone surrogate escape)") from None
            if not text.strip():
                raise DataError(f"{where}: empty caption")
            path = (split_dir / name).resolve()
            if os.path.isabs(name) or not path.is_relative_to(root):
                raise DataError(f"{where}: file_name {name!r} points outside {split_dir}")
            if not path.is_file():
                raise DataError(f"{where}: image file {name!r} not found")
            files.append(str(path))
            texts.append(text)
    if not files:
        raise DataError(f"{metadata}: no samples (the file is empty)")
    return files, texts


def _carve(num_rows: int, split: str, fraction: float, seed: int, where: str) -> list[int]:
    """Row indices of ``split`` when validation is carved from train: a seeded, stable choice."""
    if num_rows < 2:
        raise DataError(f"{where}: {num_rows} sample(s) cannot be split into train and validation")
    if not 0 < fraction < 1:
        raise DataError(f"dataset.validation_fraction: must be in (0, 1), got {fraction}")
    count = min(num_rows - 1, max(1, round(num_rows * fraction)))
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(int(seed))).tolist()
    chosen = order[:count] if split == "validation" else order[count:]
    return sorted(chosen)


class FileRows:
    """A plain image folder's rows, image file paths and captions, read as ``ImageTextFolder`` reads a
    ``datasets.Dataset`` (``rows["text"]``, ``rows[i]["image"]``): such a folder needs no ``datasets`` package."""

    def __init__(self, images: Sequence[str], texts: Sequence[str]) -> None:
        self.columns = {"image": list(images), "text": list(texts)}

    def __len__(self) -> int:
        return len(self.columns["text"])

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self.columns[key]
        return {"image": self.columns["image"][key], "text": self.columns["text"][key]}


class ImageTextFolder(torch.utils.data.Dataset):
    """Image-caption pairs from local files. Build with :func:`image_folder_dataset`.

    ``rows`` is a ``FileRows`` (a plain folder) or a ``datasets.Dataset`` (a ``save_to_disk`` folder) with an
    ``image`` column (a file path, or ``{"bytes", "path"}``) and a ``text`` column; ``captions`` is the list of texts.
    """

    def __init__(
        self,
        rows,
        *,
        split: str,
        source: str,
        image_size: int = 224,
        max_skipped_fraction: float = 0.01,
        max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS,
        transform: Mapping[str, Any] | None = None,
        probe_images: int = 16,
        draft_decode: bool = True,
    ) -> None:
        from mmtrain.data.shapes import plain_container

        self.rows = rows
        self.split = split
        self.source = source
        self.image_size = int(image_size)
        self.max_skipped_fraction = float(max_skipped_fraction)
        self.max_image_pixels = int(max_image_pixels) if max_image_pixels else None
        self.transform_kwargs = plain_container(transform or {})
        self.decode_min_side = self._decode_min_side() if draft_decode else None
        self.captions: list[str] = list(rows["text"])
        self.num_skipped = 0  # per process: workers count their own; the loader's count is the global one
        self._probe(probe_images)

    def __len__(self) -> int:
        return len(self.captions)

    def _decode_min_side(self) -> int:
        """Shorter side an image needs so the smallest crop the transform can draw still has ``image_size`` pixels
        on each side: decoding at reduced scale down to it never makes a crop upsample that would not have."""
        if self.split != "train":
            return self.image_size  # eval: resize the shorter side to image_size, center crop
        scale_min = float((self.transform_kwargs.get("scale") or (0.08, 1.0))[0])
        ratio = self.transform_kwargs.get("ratio") or (3 / 4, 4 / 3)
        # a crop of area s*h*w and aspect r has sides sqrt(s*h*w*r) and sqrt(s*h*w/r)
        narrowest = min(float(ratio[0]), 1.0 / float(ratio[1]))
        return math.ceil(self.image_size / math.sqrt(max(scale_min, 1e-6) * narrowest))

    def _source_of(self, index: int) -> tuple[str | bytes, str]:
        value = self.rows[index]["image"]
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"], str(value.get("path") or f"{self.source}[{index}]")
            return value["path"], value["path"]
        if isinstance(value, Image.Image):  # an already decoded datasets Image feature
            return value, f"{self.source}[{index}]"
        return value, str(value)

    def load_image(self, index: int) -> Image.Image | None:
        """RGB image of row ``index``, or None (logged and counted) when it cannot be decoded."""
        source, name = self._source_of(index)
        try:
            if isinstance(source, Image.Image):
                return _to_rgb(source)
            return decode_image(source, self.max_image_pixels, min_side=self.decode_min_side)
        except Exception as error:  # corrupt files raise many types (OSError, SyntaxError, struct.error, ...)  # noqa: BLE001
            self.num_skipped += 1
            if self.num_skipped <= _MAX_LOGGED_SKIPS:
                logger.warning("skipping unreadable image %s: %s: %s", name, type(error).__name__, error)
            return None

    def __getitem__(self, index: int) -> dict | None:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image = self.load_image(index)
        if image is None:
            return None
        return {"image": image, "text": self.captions[index], "index": index}

    def _probe(self, limit: int) -> None:
        """A clear error up front when the first images (all of them, for a small folder) are unreadable."""
        errors = []
        for index in range(min(limit, len(self))):
            source, name = self._source_of(index)
            try:
                if not isinstance(source, Image.Image):
                    decode_image(source, self.max_image_pixels)
                return
            except Exception as error:  # noqa: BLE001
                errors.append(f"{name}: {type(error).__name__}: {error}")
        if errors:
            scope = "no image" if len(errors) == len(self) else f"none of the first {len(errors)} images"
            raise DataError(f"{self.source}: {scope} could be read (first: {errors[0]})")

    def make_transform(self, train: bool | None = None):
        """The image transform for this split (augmenting when ``train``; default: split == "train")."""
        from mmtrain.data.transforms import ContrastiveImageTransform

        train = self.split == "train" if train is None else train
        return ContrastiveImageTransform(self.image_size, train=train, **self.transform_kwargs)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _from_saved(path: Path, split: str, text_column: str, image_column: str, fraction: float, seed: int):
    """(rows with image/text columns, source) from a datasets.save_to_disk folder."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001
        raise DataError(f"{path}: cannot load with datasets.load_from_disk: {error}") from None
    carve = False
    if isinstance(loaded, datasets.DatasetDict):
        has_validation = any(n in loaded for n in VALIDATION_NAMES)
        names = [split] if split in loaded else ([n for n in VALIDATION_NAMES if n in loaded] if split == "validation" else [])
        if names and (split != "train" or has_validation):
            table, where = loaded[names[0]], f"{path}[{names[0]}]"
        elif "train" in loaded:
            table, where, carve = loaded["train"], f"{path}[train]", True
        else:
            raise DataError(f"{path}: no {split!r} or 'train' split (found {list(loaded)})")
    else:
        table, where, carve = loaded, str(path), True
    for column in (image_column, text_column):
        if column not in table.column_names:
            raise DataError(f"{where}: no column {column!r} (columns: {table.column_names})")
    if carve:
        table = table.select(_carve(len(table), split, fraction, seed, where))
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    texts = table[text_column]
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where} row {row}: empty or non-string caption in column {text_column!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where} row {row}: caption is not valid UTF-8") from None
    if table.features[image_column] == datasets.Value("string"):  # file paths, relative to the dataset folder
        root = path.resolve()
        resolved = []
        for row, name in enumerate(table[image_column]):
            full = (path / name).resolve()
            if not full.is_relative_to(root):
                raise DataError(f"{where} row {row}: image path {name!r} points outside {path}")
            resolved.append(str(full))
        return datasets.Dataset.from_dict({"image": resolved, "text": texts}), where
    rows = table.select_columns([image_column, text_column])
    if image_column != "image":
        rows = rows.rename_column(image_column, "image")
    if text_column != "text":
        rows = rows.rename_column(text_column, "text")
    return rows, where


def image_folder_dataset(
    split: str,
    *,
    path: str,
    image_size: int = 224,
    text_column: str = "text",
    image_column: str = "image",
    validation_fraction: float = 0.05,
    seed: int = 0,
    max_skipped_fraction: float = 0.01,
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS,
    transform: Mapping[str, Any] | None = None,
    probe_images: int = 16,
    draft_decode: bool = True,
) -> ImageTextFolder:
    """Config builder: ``instantiate(cfg.dataset, split="train"|"validation")`` -> :class:`ImageTextFolder`."""
    if split not in ("train", "validation", "test"):
        raise DataError(f"dataset.split: unknown split {split!r}")
    if path is None or str(path) in ("", "???"):
        raise DataError("dataset.path: not set (dataset=image_folder dataset.path=DIR)")
    root = Path(os.path.expanduser(str(path)))
    if not root.exists():
        raise DataError(f"dataset.path: {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset.path: {root} is not a folder")
    if _is_saved_dataset(root):
        rows, source = _from_saved(root, split, text_column, image_column, validation_fraction, seed)
    else:
        has_validation = any((root / name).is_dir() for name in VALIDATION_NAMES)
        candidates = [split] if split != "validation" else list(VALIDATION_NAMES)
        split_dir = next((root / name for name in candidates if (root / name).is_dir()), None)
        if split_dir is not None and (split != "train" or has_validation):
            files, texts = read_metadata(split_dir, text_column)
            source = str(split_dir)
        else:
            # No validation folder: both splits come from train (or DIR itself), disjoint by a seeded choice.
            train_dir = root / "train" if (root / "train").is_dir() else root
            if split == "test" or (train_dir == root and not (root / METADATA).exists()):
                wanted = "train/ folder" if split == "train" else f"{split}/ or train/ folder"
                raise DataError(f"dataset.path: {root} has no {wanted} with {METADATA} (nor {METADATA} itself)")
            files, texts = read_metadata(train_dir, text_column)
            chosen = _carve(len(files), split, validation_fraction, seed, str(train_dir))
            files, texts = [files[i] for i in chosen], [texts[i] for i in chosen]
            source = f"{train_dir} ({split} split carved from it)"
        rows = FileRows(files, texts)
    return ImageTextFolder(
        rows, split=split, source=source, image_size=image_size, max_skipped_fraction=max_skipped_fraction,
        max_image_pixels=max_image_pixels, transform=transform, probe_images=probe_images, draft_decode=draft_decode,
    )


def write_image_folder(root: str | os.PathLike, samples: Sequence[tuple[Image.Image, str]], split: str = "train",
                       fmt: str = "JPEG") -> Path:
    """Write (image, caption) pairs as an imagefolder split (used by tests and the data benchmark)."""
    split_dir = Path(root) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    suffix = {"JPEG": ".jpg", "PNG": ".png"}.get(fmt, "." + fmt.lower())
    with open(split_dir / METADATA, "w", encoding="utf-8") as handle:
        for i, (image, text) in enumerate(samples):
            name = f"{i:06d}{suffix}"
            image.save(split_dir / name, fmt)
            handle.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return split_dir
