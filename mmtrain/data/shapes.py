"""Built-in ``shapes`` data: generated images of coloured shapes with compositional captions, no download.

Every scene is a pure function of ``(seed, split, index)``:

    image, objects, caption = render_scene(7, "train", 64)
    # image: PIL RGB, 64 x 64
    # objects: [{"shape": "circle", "colour": "red", "size": "small", "position": (cx, cy), ...}]
    # caption: "a small red circle"                        (num_objects=1)
    #          "a small red circle above a large blue square"  (num_objects=2 with relations)

Splits are disjoint: a scene (its attributes and integer geometry) is hashed to exactly one split, and a split
only keeps the scenes that hash to it, so no validation scene ever appears in train.

``ShapesCaptions`` pre-renders a split into a uint8 tensor cache of shape (N, 3, H, W) so that a training step
costs one tensor index per sample; items are ``{"image": uint8 (3, H, W), "text": str, "index": int}``.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmtrain.errors import ConfigError

SPLITS = ("train", "validation", "test")

# Saturated, well separated colours: a tiny convnet tells them apart after a few steps.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 30),
    "cyan": (40, 210, 220),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "pentagon", "hexagon")
# Radius (half the extent) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.11, "medium": 0.16, "large": 0.22}
RELATIONS = ("above", "below", "left of", "right of")

DEFAULT_COLOURS = ("red", "green", "blue", "yellow")
DEFAULT_SHAPES = ("circle", "square", "triangle")
DEFAULT_SIZES = ("small", "large")
# One of each synonym pair ("a above b" == "b below a"): zero-shot matching stays unambiguous.
DEFAULT_RELATIONS = ("above", "left of")


def _polygon(cx: float, cy: float, radius: float, sides: int, rotation: float) -> list[tuple[float, float]]:
    return [
        (cx + radius * math.cos(rotation + 2 * math.pi * k / sides), cy + radius * math.sin(rotation + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    """Draw one filled shape whose centre (cx, cy) lies inside it and whose extent is about r each way."""
    up = -math.pi / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.95
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        # Equilateral, pointing up, centroid at (cx, cy); pushed down a little so it fills its box.
        draw.polygon(_polygon(cx, cy + r * 0.2, r * 1.15, 3, up), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, up), fill=fill)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5, up), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = up + math.pi * k / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:  # pragma: no cover - validated in _check_vocabulary
        raise ValueError(shape)


def _check_vocabulary(colours: Sequence[str], shapes: Sequence[str], sizes: Sequence[str], relations: Sequence[str]) -> None:
    for name, chosen, known in (
        ("colours", colours, COLOURS),
        ("shapes", shapes, SHAPES),
        ("sizes", sizes, SIZES),
        ("relations", relations, RELATIONS),
    ):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise ConfigError(f"dataset.{name}: unknown {unknown}; choose from {list(known)}")
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"dataset.{name}: repeated entries in {list(chosen)}")
    if not colours or not shapes or not sizes:
        raise ConfigError("dataset: colours, shapes and sizes must each name at least one entry")


def describe(obj: Mapping[str, Any]) -> str:
    """'small red circle' for an object dict."""
    return f"{obj['size']} {obj['colour']} {obj['shape']}"


def _scene_key(objects: list[dict], relation: str | None) -> str:
    parts = [f"{describe(o)}@{o['position'][0]:g},{o['position'][1]:g},{o['radius']:g}" for o in objects]
    return "|".join(parts) + f"|{relation}"


def _split_of(key: str, seed: int) -> str:
    return SPLITS[zlib.crc32(f"{seed}:{key}".encode()) % len(SPLITS)]


def _sample_scene(
    rng: random.Random,
    image_size: int,
    num_objects: int,
    colours: Sequence[str],
    shapes: Sequence[str],
    sizes: Sequence[str],
    relations: Sequence[str],
    size_jitter: float,
) -> tuple[list[dict], str | None] | None:
    """Attributes and integer geometry of one scene (no pixels); None when the objects do not fit."""
    combos = [(s, c, sh) for s in sizes for c in colours for sh in shapes]
    picked = rng.sample(combos, num_objects)
    objects = []
    for size, colour, shape in picked:
        radius = SIZES[size] * image_size * (1.0 + rng.uniform(-size_jitter, size_jitter))
        # Half-pixel radius: the scene key stays small while sizes still vary.
        objects.append({"shape": shape, "colour": colour, "size": size, "radius": round(radius * 2) / 2})

    relation = rng.choice(list(relations)) if (num_objects == 2 and relations) else None

    def place(lo_x: float, hi_x: float, lo_y: float, hi_y: float) -> tuple[int, int]:
        x = rng.uniform(lo_x, hi_x) if hi_x > lo_x else (lo_x + hi_x) / 2
        y = rng.uniform(lo_y, hi_y) if hi_y > lo_y else (lo_y + hi_y) / 2
        return round(x), round(y)

    size = float(image_size)
    if relation is not None:
        a, b = objects
        ra, rb = a["radius"] + 1, b["radius"] + 1
        vertical = relation in ("above", "below")
        # First object on its side of the midline, second on the other; the cross-axis offset stays under half
        # the separation so that the other relation is not also plainly true.
        first_low = relation in ("above", "left of")
        lo_a, hi_a = (ra, size / 2 - ra) if first_low else (size / 2 + ra, size - ra)
        lo_b, hi_b = (size / 2 + rb, size - rb) if first_low else (rb, size / 2 - rb)
        main_a = rng.uniform(lo_a, hi_a) if hi_a > lo_a else (lo_a + hi_a) / 2
        main_b = rng.uniform(lo_b, hi_b) if hi_b > lo_b else (lo_b + hi_b) / 2
        cross_max = abs(main_a - main_b) / 2
        cross_a = rng.uniform(max(ra, rb), size - max(ra, rb))
        lo_c = max(rb, cross_a - cross_max)
        hi_c = min(size - rb, cross_a + cross_max)
        cross_b = rng.uniform(lo_c, hi_c) if hi_c > lo_c else cross_a
        if vertical:
            a["position"], b["position"] = (round(cross_a), round(main_a)), (round(cross_b), round(main_b))
        else:
            a["position"], b["position"] = (round(main_a), round(cross_a)), (round(main_b), round(cross_b))
    else:
        placed: list[dict] = []
        for obj in objects:
            r = obj["radius"] + 1
            for _attempt in range(50):
                pos = place(r, size - r, r, size - r)
                # Bounding boxes apart (a circle test would let square corners touch).
                if all(max(abs(pos[0] - p["position"][0]), abs(pos[1] - p["position"][1])) > r + p["radius"] + 1
                       for p in placed):
                    break
            else:
                return None  # too crowded: the caller draws a new scene
            obj["position"] = pos
            placed.append(obj)
    for obj in objects:
        cx, cy = obj["position"]
        r = obj["radius"]
        obj["bbox"] = (cx - r, cy - r, cx + r, cy + r)
        obj["rgb"] = COLOURS[obj["colour"]]
    if relation is not None:
        objects[0]["relation"] = relation
        objects[0]["relation_to"] = 1
    return objects, relation


def caption_for(objects: list[dict], relation: str | None) -> str:
    """The caption of a scene: 'a small red circle [above a large blue square]'."""
    if relation is not None:
        return f"a {describe(objects[0])} {relation} a {describe(objects[1])}"
    # Without a relation the listing order carries no meaning: sort so that each scene has one caption.
    names = sorted(describe(o) for o in objects)
    if len(names) == 1:
        return f"a {names[0]}"
    return ", ".join(f"a {n}" for n in names[:-1]) + f" and a {names[-1]}"


def render_scene(
    index: int,
    split: str,
    image_size: int,
    *,
    num_objects: int = 1,
    seed: int = 0,
    colours: Sequence[str] = DEFAULT_COLOURS,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    sizes: Sequence[str] = DEFAULT_SIZES,
    relations: Sequence[str] = DEFAULT_RELATIONS,
    size_jitter: float = 0.1,
    background: tuple[int, int, int] = (0, 0, 0),
    supersample: int = 2,
) -> tuple[Image.Image, list[dict], str]:
    """Render scene ``index`` of ``split``: deterministic per (seed, split, index), disjoint across splits.

    Returns ``(image, objects, caption)``: an RGB ``PIL.Image`` of ``image_size`` x ``image_size``; one dict per
    object with ``shape``, ``colour``, ``size`` (names), ``rgb`` (fill colour), ``position`` ((cx, cy) pixel
    centre, inside the shape), ``radius`` (pixels), ``bbox`` ((x0, y0, x1, y1)); with a relation (two objects and
    ``relations`` non-empty) the first object also carries ``relation`` and ``relation_to`` (=1); and the caption.
    """
    if split not in SPLITS:
        raise ConfigError(f"dataset.split: unknown split {split!r}; choose from {list(SPLITS)}")
    _check_vocabulary(colours, shapes, sizes, relations)
    if num_objects < 1:
        raise ConfigError(f"dataset.num_objects: must be at least 1, got {num_objects}")
    if num_objects > len(colours) * len(shapes) * len(sizes):
        raise ConfigError(f"dataset.num_objects: {num_objects} exceeds the number of distinct objects")
    if image_size < 8:
        raise ConfigError(f"dataset.image_size: must be at least 8, got {image_size}")
    if index < 0:
        raise IndexError(index)

    # A string seed goes through sha512 in random.Random: stable across processes and Python versions.
    rng = random.Random(f"shapes/{seed}/{split}/{index}")
    for _attempt in range(1000):
        scene = _sample_scene(rng, image_size, num_objects, colours, shapes, sizes, relations, size_jitter)
        if scene is None:
            continue
        objects, relation = scene
        if _split_of(_scene_key(objects, relation), seed) == split:
            break
    else:
        raise ConfigError(f"dataset: {num_objects} objects of these sizes do not fit in {image_size} x {image_size} pixels")

    # Draw at a higher resolution and box-filter down: anti-aliased edges without a slow renderer.
    scale = max(1, int(supersample))
    canvas = Image.new("RGB", (image_size * scale, image_size * scale), tuple(background))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        cx, cy = obj["position"]
        # Pixel centres sit at +0.5: keeps the drawn centre on the reported pixel after downsampling.
        _draw_shape(draw, obj["shape"], (cx + 0.5) * scale, (cy + 0.5) * scale, obj["radius"] * scale, obj["rgb"])
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX) if scale > 1 else canvas
    return image, objects, caption_for(objects, relation)


def caption_vocabulary(
    colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES, sizes: Sequence[str] = tuple(SIZES),
    relations: Sequence[str] = RELATIONS,
) -> list[str]:
    """Every word a caption can contain (sorted)."""
    words = {"a", "and", ","} | set(colours) | set(shapes) | set(sizes)
    for rel in relations:
        words.update(rel.split())
    return sorted(words)


class ShapesCaptions(torch.utils.data.Dataset):
    """Generated image-caption pairs; item ``i`` is ``{"image": uint8 (3, H, W), "text": str, "index": i}``.

    Args:
        split: "train", "validation" or "test".
        num_samples: number of scenes in this split.
        image_size: side H = W in pixels.
        num_objects: objects per image; a relation word joins them when there are exactly two.
        seed: scenes are a function of (seed, split, index).
        colours, shapes, sizes, relations: the caption vocabulary (see COLOURS, SHAPES, SIZES, RELATIONS).
        size_jitter: relative jitter of the object radius.
        cache: pre-render every image into one uint8 tensor (N, 3, H, W) at construction.
        transform: keyword arguments for ``mmtrain.data.transforms.ContrastiveImageTransform`` (scale, ratio,
            hflip, mean, std), used by :meth:`make_transform`.
    """

    def __init__(
        self,
        split: str,
        num_samples: int,
        image_size: int = 64,
        num_objects: int = 1,
        seed: int = 0,
        *,
        colours: Sequence[str] = DEFAULT_COLOURS,
        shapes: Sequence[str] = DEFAULT_SHAPES,
        sizes: Sequence[str] = DEFAULT_SIZES,
        relations: Sequence[str] = DEFAULT_RELATIONS,
        size_jitter: float = 0.1,
        background: Sequence[int] = (0, 0, 0),
        cache: bool = True,
        transform: Mapping[str, Any] | None = None,
    ) -> None:
        if num_samples < 1:
            raise ConfigError(f"dataset.num_samples: must be at least 1 for split {split!r}, got {num_samples}")
        self.split = split
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.render_kwargs = {
            "num_objects": int(num_objects), "seed": int(seed), "colours": tuple(colours), "shapes": tuple(shapes),
            "sizes": tuple(sizes), "relations": tuple(relations), "size_jitter": float(size_jitter),
            "background": tuple(int(c) for c in background),
        }
        self.transform_kwargs = plain_container(transform or {})
        self._images: torch.Tensor | None = None
        self._objects: list[list[dict]] = []
        self.captions: list[str] = []
        images = np.empty((self.num_samples, self.image_size, self.image_size, 3), dtype=np.uint8) if cache else None
        for i in range(self.num_samples):
            image, objects, caption = render_scene(i, split, self.image_size, **self.render_kwargs)
            self._objects.append(objects)
            self.captions.append(caption)
            if images is not None:
                images[i] = np.asarray(image)
        if images is not None:
            self._images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return self.num_samples

    def objects(self, index: int) -> list[dict]:
        return self._objects[index]

    def image(self, index: int) -> torch.Tensor:
        """uint8 (3, H, W)."""
        if self._images is not None:
            return self._images[index]
        image, _, _ = render_scene(index, self.split, self.image_size, **self.render_kwargs)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return {"image": self.image(index), "text": self.captions[index], "index": index}

    def make_transform(self, train: bool | None = None):
        """The image transform for this split (augmenting when ``train``; default: split == "train")."""
        from mmtrain.data.transforms import ContrastiveImageTransform

        train = self.split == "train" if train is None else train
        return ContrastiveImageTransform(self.image_size, train=train, **self.transform_kwargs)


def plain_container(node: Any) -> Any:
    """DictConfig/ListConfig (as Hydra passes nested nodes) -> plain dict/list; other mappings -> dict."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node) if isinstance(node, Mapping) else node


def shapes_dataset(
    split: str,
    *,
    train_samples: int = 4096,
    validation_samples: int = 512,
    image_size: int = 64,
    num_objects: int = 1,
    seed: int = 0,
    colours: Sequence[str] = DEFAULT_COLOURS,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    sizes: Sequence[str] = DEFAULT_SIZES,
    relations: Sequence[str] = DEFAULT_RELATIONS,
    size_jitter: float = 0.1,
    cache: bool = True,
    transform: Mapping[str, Any] | None = None,
) -> ShapesCaptions:
    """Config builder: ``instantiate(cfg.dataset, split="train"|"validation")`` -> :class:`ShapesCaptions`."""
    counts = {"train": train_samples, "validation": validation_samples, "test": validation_samples}
    if split not in counts:
        raise ConfigError(f"dataset.split: unknown split {split!r}; choose from {list(counts)}")
    return ShapesCaptions(
        split, counts[split], image_size, num_objects, seed,
        colours=plain_container(colours), shapes=plain_container(shapes), sizes=plain_container(sizes),
        relations=plain_container(relations),
        size_jitter=size_jitter, cache=cache, transform=transform,
    )
