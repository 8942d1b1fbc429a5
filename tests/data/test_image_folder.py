"""image_folder: the imagefolder layout on disk, every bad input ending in a DataError or a counted skip."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmtrain.data.image_folder import decode_image, image_folder_dataset, write_image_folder
from mmtrain.data.loader import build_contrastive_loader
from mmtrain.data.tokenizers import shapes_tokenizer
from mmtrain.errors import DataError


def _rgb(i, size=(12, 10)):
    return Image.new("RGB", size, (10 * i % 256, 200, 30))


def _png_bomb(width=30000, height=30000):
    """A PNG whose header claims width x height pixels, with almost no data: opening must not decode it."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _write_meta(split_dir, rows):
    with open(split_dir / "metadata.jsonl", "wb") as f:
        f.writelines(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode() for row in rows)


def test_reads_train_and_carves_a_stable_validation(tmp_path):
    write_image_folder(tmp_path, [(_rgb(i), f"caption {i}") for i in range(20)])
    train = image_folder_dataset("train", path=str(tmp_path), image_size=8, validation_fraction=0.2)
    val = image_folder_dataset("validation", path=str(tmp_path), image_size=8, validation_fraction=0.2)
    assert len(train) == 16 and len(val) == 4 and not set(train.captions) & set(val.captions)
    again = image_folder_dataset("validation", path=str(tmp_path), image_size=8, validation_fraction=0.2)
    assert again.captions == val.captions
    item = train[0]
    assert item["image"].mode == "RGB" and item["image"].size == (12, 10) and item["text"] == train.captions[0]
    write_image_folder(tmp_path, [(_rgb(i), f"val {i}") for i in range(3)], split="validation")
    assert image_folder_dataset("validation", path=str(tmp_path)).captions == ["val 0", "val 1", "val 2"]


def test_modes_are_converted_to_rgb(tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    gray = Image.new("L", (6, 6), 100)
    rgba = Image.new("RGBA", (6, 6), (255, 0, 0, 0))  # fully transparent red -> white background
    cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # red in CMYK
    deep = Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16))  # 16-bit white
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    for name, image, fmt in [("g.png", gray, "PNG"), ("a.png", rgba, "PNG"), ("c.jpg", cmyk, "JPEG"),
                             ("d.png", deep, "PNG"), ("p.png", palette, "PNG")]:
        image.save(d / name, fmt)
    _write_meta(d, [{"file_name": n, "text": n} for n in ["g.png", "a.png", "c.jpg", "d.png", "p.png"]])
    write_image_folder(tmp_path, [(_rgb(0), "v")], split="validation")  # so train keeps every row
    ds = image_folder_dataset("train", path=str(tmp_path))
    pixels = [np.asarray(ds[i]["image"])[3, 3].tolist() for i in range(5)]
    assert all(ds[i]["image"].mode == "RGB" for i in range(5))
    assert pixels[0] == [100, 100, 100] and pixels[1] == [255, 255, 255] and pixels[3] == [255, 255, 255]
    assert pixels[4] == [0, 0, 255]
    r, g, b = pixels[2]
    assert r > 200 and g < 60 and b < 60


def test_corrupt_truncated_and_bomb_images_are_skipped_and_counted(tmp_path):
    d = write_image_folder(tmp_path, [(_rgb(i), f"ok {i}") for i in range(4)], fmt="JPEG")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "bomb.png").write_bytes(_png_bomb())
    Image.new("RGB", (300, 300)).save(d / "big.png")  # over the configured pixel limit below
    with open(d / "metadata.jsonl", "a") as f:
        f.writelines(json.dumps({"file_name": name, "text": name}) + "\n" for name in ["corrupt.jpg", "truncated.png", "bomb.png", "big.png"])
    write_image_folder(tmp_path, [(_rgb(0), "v")], split="validation")
    ds = image_folder_dataset("train", path=str(tmp_path), image_size=8, max_image_pixels=50_000,
                              max_skipped_fraction=0.6)
    full = image_folder_dataset("train", path=str(tmp_path), image_size=8, max_image_pixels=50_000)
    assert [full[i] is None for i in range(8)] == [False] * 4 + [True] * 4
    with pytest.raises(Image.DecompressionBombError):
        decode_image(_png_bomb())  # PIL's own limit, from the header alone
    loader = build_contrastive_loader(ds, shapes_tokenizer(8), batch_size=3, shuffle=False)
    batches = list(loader)
    kept = sum(b["index"].numel() for b in batches)
    skipped = sum(int(b["num_skipped"]) for b in batches)
    # Batches [0 1 2] [3 4 5] [6 7]: the last one is all unreadable, so it is not handed out; the loader's
    # total still counts it.
    assert kept == 4 and skipped == 2 and loader.total_skipped == 4
    assert all(b["pixel_values"].shape[1:] == (3, 8, 8) for b in batches)
    strict = build_contrastive_loader(full, shapes_tokenizer(8), batch_size=4, shuffle=False)
    with pytest.raises(DataError, match="max_skipped_fraction=0.01"):
        list(strict)


def test_no_readable_image_is_a_data_error(tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    (d / "x.jpg").write_bytes(b"garbage")
    _write_meta(d, [{"file_name": "x.jpg", "text": "a"}, {"file_name": "x.jpg", "text": "b"}])
    with pytest.raises(DataError, match="no image could be read"):
        image_folder_dataset("train", path=str(tmp_path))


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"file_name": "0.jpg", "text": "ok"}, b'{"file_name": "0.jpg", "text": \n'], r"metadata.jsonl:2: malformed JSON"),
        ([{"file_name": "0.jpg", "text": "ok"}, {"file_name": "nope.jpg", "text": "x"}], r"metadata.jsonl:2: image file 'nope.jpg' not found"),
        ([{"file_name": "0.jpg", "text": "  "}], r"metadata.jsonl:1: empty caption"),
        ([b'{"file_name": "0.jpg", "text": "caf\xe9"}\n'], r"metadata.jsonl:1: not valid UTF-8"),
        ([{"file_name": "0.jpg", "text": "\udc80"}], r"metadata.jsonl:1: caption is not valid UTF-8"),
        ([{"file_name": "../escape.jpg", "text": "x"}], r"metadata.jsonl:1: file_name '../escape.jpg' points outside"),
        ([{"file_name": "0.jpg"}], r"metadata.jsonl:1: missing or non-string 'text'"),
        ([[1, 2]], r"metadata.jsonl:1: expected a JSON object"),
        ([], r"metadata.jsonl: no samples"),
    ],
)
def test_bad_metadata_names_file_and_line(tmp_path, rows, match):
    d = tmp_path / "train"
    d.mkdir()
    _rgb(0).save(d / "0.jpg")
    _rgb(0).save(tmp_path / "escape.jpg")
    _write_meta(d, rows)
    with pytest.raises(DataError, match=match):
        image_folder_dataset("train", path=str(tmp_path))


def test_missing_folder_and_metadata(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder_dataset("train", path=str(tmp_path / "absent"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no metadata.jsonl"):
        image_folder_dataset("train", path=str(tmp_path))
    with pytest.raises(DataError, match="dataset.path: not set"):
        image_folder_dataset("train", path="???")


def test_overlong_caption_is_truncated_by_the_tokenizer(tmp_path):
    write_image_folder(tmp_path, [(_rgb(0), "red " * 500), (_rgb(1), "blue")])
    ds = image_folder_dataset("train", path=str(tmp_path), image_size=8, validation_fraction=0.5)
    batch = next(iter(build_contrastive_loader(ds, shapes_tokenizer(8), batch_size=1)))
    assert batch["input_ids"].shape == (1, 8)


def test_load_from_disk_folder(tmp_path):
    import datasets

    images = []
    for i in range(6):
        buf = io.BytesIO()
        _rgb(i).save(buf, "PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    table = datasets.Dataset.from_dict({"img": images, "caption": [f"c{i}" for i in range(6)]})
    table = table.cast_column("img", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    train = image_folder_dataset("train", path=str(tmp_path / "saved"), image_column="img", text_column="caption",
                                 validation_fraction=0.34, image_size=8)
    val = image_folder_dataset("validation", path=str(tmp_path / "saved"), image_column="img",
                               text_column="caption", validation_fraction=0.34, image_size=8)
    assert len(train) == 4 and len(val) == 2 and sorted(train.captions + val.captions) == [f"c{i}" for i in range(6)]
    assert train[0]["image"].mode == "RGB"
    pixels = train.make_transform(train=False)(train[0]["image"], train[0]["text"])
    assert pixels.shape == (3, 8, 8) and torch.isfinite(pixels).all()
    with pytest.raises(DataError, match="no column 'text'"):
        image_folder_dataset("train", path=str(tmp_path / "saved"), image_column="img")


def _smooth_jpeg(width, height, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return image, buffer.getvalue()


def test_large_jpeg_decodes_at_reduced_scale_but_never_below_what_the_crop_needs(tmp_path):
    original, data = _smooth_jpeg(640, 480)
    assert decode_image(data).size == (640, 480)
    assert decode_image(data, min_side=60).size == (80, 60)  # 1/8 keeps the shorter side at 60
    assert decode_image(data, min_side=100).size == (160, 120)  # 1/4
    assert decode_image(data, min_side=130).size == (320, 240)  # 1/4 would leave a 120 px side < 130
    assert decode_image(data, min_side=300).size == (640, 480)  # less than 2x the need: full size
    buffer = io.BytesIO()
    original.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), min_side=60).size == (640, 480)  # only JPEG has a DCT-domain draft

    write_image_folder(tmp_path, [(original, "a photo")] * 4, split="train", fmt="JPEG")
    write_image_folder(tmp_path, [(original, "a photo")] * 2, split="validation", fmt="JPEG")
    train = image_folder_dataset("train", path=str(tmp_path), image_size=32, transform={"scale": [0.5, 1.0]})
    # smallest crop: area 0.5 at aspect 3/4 -> sides sqrt(0.375) of the image; 32 / sqrt(0.375) = 52.3
    assert train.decode_min_side == 53
    assert min(train.load_image(0).size) >= 53 and train.load_image(0).size == (80, 60)
    val = image_folder_dataset("validation", path=str(tmp_path), image_size=32)
    assert val.decode_min_side == 32 and val.load_image(0).size == (80, 60)
    full = image_folder_dataset("validation", path=str(tmp_path), image_size=32, draft_decode=False)
    assert full.decode_min_side is None and full.load_image(0).size == (640, 480)
    # the eval pixels barely change: both paths downsample the same smooth photo to 32 px
    reduced, exact = val.make_transform()(val.load_image(0)), full.make_transform()(full.load_image(0))
    assert (reduced - exact).abs().mean() < 0.03  # normalized units: under 1% of the [-1, 1] range


def test_decode_applies_the_exif_orientation():
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, :10, 0] = 255  # left half red: after a 90 degree turn it is the top or bottom half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    upright = np.asarray(decode_image(buffer.getvalue()))
    assert upright.shape == (20, 10, 3)
    assert upright[:8, :, 0].mean() > 200 and upright[12:, :, 0].mean() < 50  # red on top: turned clockwise
    plain = io.BytesIO()
    Image.fromarray(array).save(plain, "JPEG", quality=95)
    assert np.asarray(decode_image(plain.getvalue())).shape == (10, 20, 3)


def test_plain_folder_needs_no_datasets_package(tmp_path, monkeypatch):
    """Only save_to_disk folders go through `datasets`; a plain imagefolder reads with it absent (as on a machine
    that lacks it)."""
    import sys

    write_image_folder(tmp_path, [(_rgb(i), f"caption {i}") for i in range(6)])
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    train = image_folder_dataset("train", path=str(tmp_path), image_size=8)
    validation = image_folder_dataset("validation", path=str(tmp_path), image_size=8)
    assert len(train) + len(validation) == 6 and len(validation) >= 1
    item = train[0]
    assert item["text"].startswith("caption ") and item["image"].size == (12, 10)
    batch = next(iter(build_contrastive_loader(train, shapes_tokenizer(8), batch_size=2)))
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
