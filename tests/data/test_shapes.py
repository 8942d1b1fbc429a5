"""Built-in shapes data: determinism, split disjointness, captions that tell the truth about the pixels."""

import numpy as np
import pytest
import torch

from mmtrain.data.shapes import (
    COLOURS,
    ShapesCaptions,
    _sample_scene,
    _scene_key,
    render_scene,
    shapes_dataset,
)
from mmtrain.errors import ConfigError


def test_render_is_deterministic_per_seed_split_index():
    a_img, a_obj, a_cap = render_scene(11, "train", 32, seed=3)
    b_img, b_obj, b_cap = render_scene(11, "train", 32, seed=3)
    assert a_img.tobytes() == b_img.tobytes() and a_obj == b_obj and a_cap == b_cap
    assert a_img.size == (32, 32) and a_img.mode == "RGB"
    other = [render_scene(11, "train", 32, seed=4)[0].tobytes(), render_scene(12, "train", 32, seed=3)[0].tobytes()]
    assert a_img.tobytes() not in other


def test_splits_are_disjoint():
    import random

    keys = {}
    for split in ("train", "validation"):
        keys[split] = set()
        for i in range(300):
            _, objects, _ = render_scene(i, split, 32, num_objects=1)
            keys[split].add(_scene_key([{k: o[k] for k in ("shape", "colour", "size", "position", "radius")}
                                        for o in objects], None))
    assert not keys["train"] & keys["validation"]
    # Sanity: the scene space is small enough that independent sampling *would* collide, so the test can fail.
    rng = random.Random(0)
    sampled = [_scene_key(*_sample_scene(rng, 32, 1, ["red"], ["circle"], ["small"], [], 0.0)) for _ in range(300)]
    assert len(set(sampled)) < 300


@pytest.mark.parametrize("num_objects", [1, 2, 3])
def test_caption_matches_pixels_and_geometry(num_objects):
    for index in range(25):
        image, objects, caption = render_scene(index, "validation", 64, num_objects=num_objects, seed=1)
        pixels = np.asarray(image)
        assert len(objects) == num_objects
        for obj in objects:
            cx, cy = obj["position"]
            assert tuple(pixels[cy, cx]) == COLOURS[obj["colour"]], (caption, obj)
            assert f"{obj['size']} {obj['colour']} {obj['shape']}" in caption
        if num_objects == 2:
            a, b = objects
            relation = a["relation"]
            assert caption == f"a {a['size']} {a['colour']} {a['shape']} {relation} a {b['size']} {b['colour']} {b['shape']}"
            (ax, ay), (bx, by) = a["position"], b["position"]
            if relation == "above":
                assert ay + a["radius"] < by - b["radius"]
                assert abs(ax - bx) < (by - ay)  # not also plainly "left of"
            elif relation == "left of":
                assert ax + a["radius"] < bx - b["radius"]
                assert abs(ay - by) < (bx - ax)
            else:
                raise AssertionError(relation)
        # Background stays background away from every object.
        far = [(x, y) for x in (0, 63) for y in (0, 63)
               if all(abs(x - o["position"][0]) > o["radius"] + 2 or abs(y - o["position"][1]) > o["radius"] + 2
                      for o in objects)]
        for x, y in far:
            assert tuple(pixels[y, x]) == (0, 0, 0)


def test_dataset_cache_matches_render_and_item_contract():
    ds = shapes_dataset("validation", validation_samples=64, image_size=32, seed=2)
    assert isinstance(ds, ShapesCaptions) and len(ds) == 64
    item = ds[5]
    image, _, caption = render_scene(5, "validation", 32, seed=2)
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    assert torch.equal(item["image"], torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert item["text"] == caption == ds.captions[5] and item["index"] == 5
    uncached = ShapesCaptions("validation", 8, 32, seed=2, cache=False)
    assert torch.equal(uncached[5]["image"], item["image"])
    with pytest.raises(IndexError):
        ds[64]


def test_default_caption_space_is_covered_by_validation():
    ds = shapes_dataset("validation", validation_samples=256, image_size=32)
    assert len(set(ds.captions)) == 4 * 3 * 2  # colours x shapes x sizes: every class appears


def test_bad_vocabulary_is_a_config_error():
    with pytest.raises(ConfigError, match="do not fit"):
        render_scene(0, "train", 16, num_objects=12, sizes=("large",))
    with pytest.raises(ConfigError, match="dataset.colours"):
        render_scene(0, "train", 32, colours=("red", "mauve"))
    with pytest.raises(ConfigError, match="dataset.split"):
        shapes_dataset("holdout")
