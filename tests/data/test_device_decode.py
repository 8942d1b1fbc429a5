"""decode_on_device: workers hand over JPEG bytes and crops; the device decoder crops exactly what the CPU path crops,
falls back to CPU decoding for files it does not take, and drops (and counts) files it cannot decode. Run on CPU:
torchvision's decode_jpeg takes the same code path with device="cpu" (nvJPEG replaces it on CUDA)."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmtrain.data.image_folder import image_folder_dataset
from mmtrain.data.loader import build_contrastive_loader
from mmtrain.data.tokenizers import shapes_tokenizer
from mmtrain.errors import ConfigError, DataError


def _folder(root, kinds):
    """One image per entry of ``kinds``: jpeg, gray, png, cmyk, rotated, truncated, garbage."""
    split = root / "train"
    split.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, kind in enumerate(kinds):
        pixels = (rng.random((40 + 2 * i, 52 - i, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        name = f"{i:02d}.png" if kind == "png" else f"{i:02d}.jpg"
        if kind == "png":
            image.save(split / name)
        elif kind == "gray":
            image.convert("L").save(split / name, quality=90)
        elif kind == "cmyk":
            image.convert("CMYK").save(split / name, quality=90)
        elif kind == "rotated":
            exif = Image.Exif()
            exif[0x0112] = 6
            image.save(split / name, quality=90, exif=exif.tobytes())
        else:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=90)
            data = buffer.getvalue()
            data = data[: len(data) // 2] if kind == "truncated" else b"not an image" if kind == "garbage" else data
            (split / name).write_bytes(data)
        side = "left" if i % 3 == 0 else "right" if i % 3 == 1 else "up"  # captions that forbid a flip too
        lines.append(json.dumps({"file_name": name, "text": f"photo {i} {side} {kind}"}))
    (split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    validation = root / "validation"  # its own folder, so train keeps every row (nothing carved off)
    validation.mkdir()
    Image.fromarray(pixels).save(validation / "v.jpg")
    (validation / "metadata.jsonl").write_text(json.dumps({"file_name": "v.jpg", "text": "v"}) + "\n")
    return image_folder_dataset("train", path=str(root), image_size=24, probe_images=0)


def _loader(dataset, decode, batch_size=8):
    return build_contrastive_loader(dataset, shapes_tokenizer(12), batch_size=batch_size, shuffle=True, seed=3,
                                    num_workers=0, normalize_on_device=True, decode_on_device="cpu" if decode else None)


def _host_batches(loader, epochs=1):
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            if loader.device_decoder is not None:
                batch = loader.device_decoder(batch)
            out.append(batch)
    return out


def test_device_decode_crops_exactly_what_the_cpu_path_crops(tmp_path):
    kinds = ["jpeg", "gray", "jpeg", "png", "cmyk", "jpeg", "rotated", "jpeg", "jpeg", "gray"]
    dataset = _folder(tmp_path, kinds)
    plain, device = _host_batches(_loader(dataset, False), 2), _host_batches(_loader(dataset, True), 2)
    assert len(plain) == len(device) == 4  # 10 images, batches of 8, two epochs (new crops each epoch)
    for a, b in zip(plain, device):
        assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape[1:] == (3, 24, 24)
        for key in ("index", "input_ids", "attention_mask", "num_skipped"):
            assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(b["pixel_values"], a["pixel_values"], rtol=0, atol=0)
    assert len({tuple(b["index"].tolist()) for b in device}) > 1  # shuffled per epoch
    normalized = _loader(dataset, True).pixel_normalizer(device[0]["pixel_values"])
    assert normalized.dtype == torch.float32 and normalized.shape == device[0]["pixel_values"].shape


def test_files_the_device_does_not_take_are_decoded_in_the_workers(tmp_path):
    dataset = _folder(tmp_path, ["png", "cmyk", "rotated", "jpeg"])
    items = _loader(dataset, True).dataset
    assert ["encoded" in items[i] for i in range(4)] == [False, False, False, True]
    rotated = items[2]["pixel_values"]  # EXIF orientation 6 applied, as on the CPU path
    assert rotated.dtype == torch.uint8 and rotated.shape == (3, 24, 24)


def test_a_file_the_decoder_rejects_is_dropped_with_its_text_and_counted(tmp_path, caplog):
    dataset = _folder(tmp_path, ["jpeg", "truncated", "jpeg", "jpeg"])
    (batch,) = _host_batches(_loader(dataset, True, batch_size=4))
    assert batch["pixel_values"].shape[0] == 3 and int(batch["num_skipped"]) == 1
    assert 1 not in batch["index"].tolist() and batch["input_ids"].shape[0] == 3
    assert batch["attention_mask"].shape[0] == 3 and "cannot read" in caplog.text


def test_a_batch_with_no_decodable_image_is_a_data_error(tmp_path):
    dataset = _folder(tmp_path, ["truncated", "truncated"])
    loader = _loader(dataset, True, batch_size=2)
    with pytest.raises(DataError, match="none of the 2 images of a batch could be decoded on cpu"):
        _host_batches(loader)


def test_decode_on_device_needs_an_image_folder_and_the_training_transform(tmp_path):
    from mmtrain.data.shapes import shapes_dataset

    with pytest.raises(ConfigError, match="decode_on_device: needs an image folder dataset"):
        build_contrastive_loader(shapes_dataset("train", train_samples=8, image_size=16), shapes_tokenizer(12),
                                 batch_size=4, decode_on_device="cpu")
    dataset = _folder(tmp_path, ["jpeg"])
    with pytest.raises(ConfigError, match="training transform only"):
        build_contrastive_loader(dataset, shapes_tokenizer(12), dataset.make_transform(train=False), batch_size=1,
                                 decode_on_device="cpu")


def test_contrastive_recipe_with_decode_on_device_trains_exactly_like_worker_decoding(tmp_path):
    from mmtrain.data.image_folder import write_image_folder
    from tests.recipes.test_contrastive import _events, _recipe, tiny_cfg

    rng = np.random.default_rng(1)
    colours = ["red", "green", "blue", "yellow"]

    def samples(n):
        return [(Image.fromarray((rng.random((20, 22, 3)) * 255).astype(np.uint8)), f"a {colours[i % 4]} photo")
                for i in range(n)]

    write_image_folder(tmp_path / "data", samples(32), "train")
    write_image_folder(tmp_path / "data", samples(8), "validation")
    dataset = {"_target_": "mmtrain.data.image_folder.image_folder_dataset", "path": str(tmp_path / "data"),
               "image_size": 16}
    recipe = _recipe()
    for decode in (False, True):
        cfg = tiny_cfg(tmp_path / str(decode), max_steps=4, decode_on_device=decode, normalize_on_device=True,
                       **{"checkpoint.every_n_steps": 100, "eval.every_n_steps": 100})
        cfg.dataset = dataset
        recipe.main(cfg)
    losses = {d: [e["loss"] for e in _events(tmp_path / str(d)) if "loss" in e] for d in (False, True)}
    assert len(losses[True]) == 4 and losses[True] == losses[False]

    shapes = tiny_cfg(tmp_path / "shapes", decode_on_device=True)
    with pytest.raises(ConfigError, match="decode_on_device: needs an image folder dataset"):
        recipe.main(shapes)


def test_unreadable_or_oversized_files_are_skipped_and_counted_by_the_cpu_path(tmp_path):
    dataset = _folder(tmp_path, ["garbage", "jpeg", "jpeg"])
    items = _loader(dataset, True).dataset
    assert items[0] is None and dataset.num_skipped == 1
    assert "encoded" in items[1]
    dataset.max_image_pixels = 100  # every image is over the limit now: decompression-bomb rule, read from the header
    assert items[1] is None and dataset.num_skipped == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_on_cuda_gives_the_cpu_crops_within_decoder_rounding(tmp_path):
    """nvJPEG's inverse DCT and chroma upsampling round differently from libjpeg's, most on noise: smooth images,
    so that what is compared is the crops, resizing and flips (and no stream race corrupting them)."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    from mmtrain.data.image_folder import write_image_folder

    y, x = np.mgrid[0:48, 0:60]
    samples = []
    for i in range(8):
        pixels = np.stack([128 + 100 * np.sin((x + 7 * i) / 9.0), 128 + 100 * np.cos((y - 5 * i) / 7.0),
                           (x + y + 10 * i) % 256], axis=-1)
        samples.append((Image.fromarray(pixels.astype(np.uint8)), f"photo {i} {'left' if i % 3 == 0 else 'cat'}"))
    write_image_folder(tmp_path, samples, "train")
    write_image_folder(tmp_path, samples[:1], "validation")  # its own split: train keeps all 8
    dataset = image_folder_dataset("train", path=str(tmp_path), image_size=24, probe_images=0)
    plain = _host_batches(_loader(dataset, False))
    loader = build_contrastive_loader(dataset, shapes_tokenizer(12), batch_size=8, shuffle=True, seed=3, num_workers=0,
                                      normalize_on_device=True, decode_on_device=torch.device("cuda"))
    assert loader.device_decoder.batched
    host = next(iter(loader))
    on_cuda = loader.device_decoder(dict(host))
    a, b = plain[0], on_cuda
    assert b["pixel_values"].is_cuda and b["pixel_values"].dtype == torch.uint8
    assert torch.equal(a["index"], b["index"].cpu())
    difference = (a["pixel_values"].int() - b["pixel_values"].cpu().int()).abs()
    assert difference.float().mean() < 2.0 and difference.max() <= 32, (difference.float().mean(), difference.max())

    # Against nvJPEG's own full images, cropped and resized one by one by torchvision: the batched path's rounding only.
    sizes = host["encoded_lengths"].tolist()
    for row, (data, (top, left, h, w), flip) in enumerate(zip(host["encoded"].split(sizes), host["crops"].tolist(),
                                                              host["flips"].tolist())):
        full = decode_jpeg(data, device="cuda").cpu()
        expected = F.resized_crop(full, top, left, h, w, [24, 24], antialias=True)
        expected = F.horizontal_flip(expected) if flip else expected
        position = host["encoded_positions"][row]
        assert (b["pixel_values"][position].cpu().int() - expected.int()).abs().max() <= 2
