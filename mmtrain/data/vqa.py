"""Visual question answering data for fusion models: a built-in task (no download) and local chat datasets.

A sample is a list of chat messages with ``<|image|>`` tokens interleaved in the text, e.g.

    <|begin_of_text|> <|user|> <|image|> what colour is the circle ? <|eot|> <|assistant|> red <|eot|>

and items follow torchtune's multimodal sample layout (what the fusion collator pads and stacks):

    tokens: list[int] (s,)                     labels: list[int] (s,), -100 except assistant answers + their <|eot|>
    encoder_input: {"images": [(n_tiles, 3, tile, tile) float], "aspect_ratio": [(2,) long]}
    encoder_mask: [bool (s, n_tiles * tokens_per_tile)]   one per image (``VisionCrossAttentionMask``)

``prompt_sample(i)`` gives the same without the answer (tokens end with ``<|assistant|>``) and the answer text,
for generation-based evaluation.

- ``VQATokenizer``: a word-level tokenizer over ``assets/vqa_vocab.txt`` (or your own vocabulary file). Ids below
  ``image_token_id`` are the base vocabulary; ``<|image|>`` is ``image_token_id``, the first of the decoder's
  fusion (special) tokens, as Llama 3.2 Vision's ``<|image|>`` = 128256 is.
- ``ShapesVQA`` / ``shapes_vqa_dataset``: images from ``mmtrain.data.shapes.render_scene`` with questions that have
  one short answer ("what colour is the circle?" -> "red"); train / validation / test splits are disjoint.
- ``ChatVQADataset`` / ``chat_vqa_dataset``: JSONL (through ``datasets``) rows
  ``{"messages": [{"role": "user", "content": "<|image|>..."}, {"role": "assistant", "content": "..."}],
  "images": ["relative/or/absolute.png"]}``; ``content`` may also be a list of ``{"type": "image"}`` /
  ``{"type": "text", "text": ...}`` parts.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtrain.data.shapes import plain_container
from mmtrain.errors import ConfigError, DataError

__all__ = [
    "CROSS_ENTROPY_IGNORE_IDX",
    "ChatVQADataset",
    "ShapesVQA",
    "VQATokenizer",
    "build_prompt",
    "chat_vqa_dataset",
    "content_parts",
    "shapes_vqa_dataset",
    "vqa_tokenizer",
]

CROSS_ENTROPY_IGNORE_IDX = -100
VOCAB_PATH = Path(__file__).parent / "assets" / "vqa_vocab.txt"
IMAGE_TOKEN = "<|image|>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SPLIT_RE = re.compile(r"<\|image\|>|[a-z0-9]+|[^\sa-z0-9]")
_ATTACHED = {"?", ".", ",", "!", ":", "'"}


class VQATokenizer:
    """Word-level tokenizer with chat special tokens.

    Args:
        vocab_path: one token per line; the first lines must be ``<|pad|> <|unk|> <|begin_of_text|> <|eot|>
            <|user|> <|assistant|>`` (ids 0-5). Default: the built-in ``assets/vqa_vocab.txt``.
        image_token_id: id of ``<|image|>``; must be >= the vocabulary size (it is a fusion token).
        max_seq_len: tokens kept per sample (longer samples are truncated).
    """

    SPECIALS = ("<|pad|>", "<|unk|>", "<|begin_of_text|>", "<|eot|>", "<|user|>", "<|assistant|>")

    def __init__(self, vocab_path: str | os.PathLike | None = None, image_token_id: int = 128,
                 max_seq_len: int = 64) -> None:
        path = Path(vocab_path) if vocab_path else VOCAB_PATH
        try:
            words = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as err:
            raise ConfigError(f"tokenizer.vocab_path: cannot read {path} ({err.strerror or err})") from err
        if tuple(words[: len(self.SPECIALS)]) != self.SPECIALS:
            raise ConfigError(f"tokenizer.vocab_path: {path} must start with {' '.join(self.SPECIALS)}")
        if len(words) > image_token_id:
            raise ConfigError(f"tokenizer.image_token_id: {image_token_id} is inside the vocabulary of {len(words)} "
                              f"tokens from {path}; it must be >= the vocabulary size (the model's vocab_size)")
        self.vocab = {w: i for i, w in enumerate(words)}
        self.words = words
        self.pad_id, self.unk_id, self.bos_id, self.eot_id, self.user_id, self.assistant_id = range(6)
        self.eos_id = self.eot_id
        self.image_token_id = image_token_id
        self.max_seq_len = max_seq_len

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def stop_tokens(self) -> list[int]:
        return [self.eot_id]

    def encode(self, text: str) -> list[int]:
        """Lower-cased words and punctuation -> ids (unknown words -> ``<|unk|>``); ``<|image|>`` -> image id."""
        ids = []
        for piece in _SPLIT_RE.findall(text.lower()):
            ids.append(self.image_token_id if piece == IMAGE_TOKEN else self.vocab.get(piece, self.unk_id))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text, special tokens dropped, punctuation attached to the previous word."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = ""
        for i in ids:
            if i < len(self.SPECIALS) or i >= len(self.words):
                continue
            word = self.words[i]
            out += word if (not out or word in _ATTACHED) else " " + word
        return out

    def tokenize_messages(self, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Chat messages -> (tokens, labels). Labels are -100 everywhere except assistant content and the
        ``<|eot|>`` closing it (the model learns to answer and to stop). With ``add_generation_prompt`` the
        tokens end with ``<|assistant|>`` for the model to continue."""
        tokens, labels = [self.bos_id], [CROSS_ENTROPY_IGNORE_IDX]
        for message in messages:
            role = message["role"]
            if role not in ("user", "assistant", "system"):
                raise DataError(f"message role {role!r}: expected 'user', 'assistant' or 'system'")
            header = self.assistant_id if role == "assistant" else self.user_id
            body = self.encode(_content_text(message["content"])) + [self.eot_id]
            tokens += [header] + body
            trained = role == "assistant" and message.get("masked", False) is not True
            labels += [CROSS_ENTROPY_IGNORE_IDX] + (body if trained else [CROSS_ENTROPY_IGNORE_IDX] * len(body))
        if add_generation_prompt:
            tokens.append(self.assistant_id)
            labels.append(CROSS_ENTROPY_IGNORE_IDX)
        return tokens[: self.max_seq_len], labels[: self.max_seq_len]


def content_parts(content: Any) -> list[str | None]:
    """A message's content (a string, or a list of ``{"type": "text" | "image", ...}`` parts) as its parts: the text
    of each text part, None for each image part; a string is one text part (its ``<|image|>`` markers left in)."""
    if isinstance(content, str):
        return [content]
    parts: list[str | None] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "image":
            parts.append(None)
        elif kind == "text":
            parts.append(str(part.get("text", part.get("content", ""))))
        else:
            raise DataError(f"message content part of type {kind!r}: expected 'text' or 'image'")
    return parts


def _content_text(content: Any) -> str:
    """A message's content as text with ``<|image|>`` markers (string or a list of typed parts)."""
    return " ".join(IMAGE_TOKEN if part is None else part for part in content_parts(content))


def vqa_tokenizer(vocab_path: str | None = None, image_token_id: int = 128, max_seq_len: int = 64) -> VQATokenizer:
    """Config builder for :class:`VQATokenizer`."""
    return VQATokenizer(vocab_path, image_token_id=image_token_id, max_seq_len=max_seq_len)


class _VQABase(torch.utils.data.Dataset):
    """Shared item construction: image transform, tokenization, cross-attention masks."""

    def __init__(self, tokenizer: VQATokenizer, tile_size: int, patch_size: int, max_num_tiles: int) -> None:
        from mmtrain.models.clip._transform import CLIPImageTransform
        from mmtrain.modules.transforms import VisionCrossAttentionMask

        self.tokenizer = tokenizer
        self.tile_size, self.patch_size, self.max_num_tiles = tile_size, patch_size, max_num_tiles
        self.image_transform = CLIPImageTransform(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                                                  tile_size=tile_size, max_num_tiles=max_num_tiles,
                                                  dtype=torch.float32)
        self.mask_transform = VisionCrossAttentionMask(tile_size=tile_size, patch_size=patch_size,
                                                       image_token_id=tokenizer.image_token_id,
                                                       max_num_tiles=max_num_tiles)

    def _messages(self, index: int) -> tuple[list[dict], list[Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _build(self, messages: list[dict], images: list[Any], *, inference: bool) -> dict[str, Any]:
        tokens, labels = self.tokenizer.tokenize_messages(messages, add_generation_prompt=inference)
        tiles, ratios = [], []
        for image in images:
            out = self.image_transform({"image": image})
            tiles.append(out["image"])
            ratios.append(out["aspect_ratio"])
        sample = {"tokens": tokens, "encoder_input": {"images": tiles, "aspect_ratio": ratios}}
        if not inference:
            sample["labels"] = labels
        return dict(self.mask_transform(sample, inference=inference))

    def __getitem__(self, index: int) -> dict[str, Any]:
        messages, images = self._messages(index)
        return self._build(messages, images, inference=False)

    def prompt_sample(self, index: int) -> tuple[dict[str, Any], str]:
        """(sample without the last assistant answer, ending with ``<|assistant|>``; that answer's text)."""
        messages, images = self._messages(index)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"sample {index}: no assistant message to evaluate against")
        # Stripped, as a tokenizer that keeps whitespace (Llama 3's) trains on the stripped answer.
        answer = self.tokenizer.decode(self.tokenizer.encode(_content_text(messages[last]["content"]).strip()))
        return self._build(messages[:last], images, inference=True), answer


class _SingleImagePrompt(_VQABase):
    def __init__(self, tokenizer: VQATokenizer, image: Any, prompt: str, **tiling: int) -> None:
        super().__init__(tokenizer, **tiling)
        text = prompt if IMAGE_TOKEN in prompt else IMAGE_TOKEN + prompt
        self.messages = [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        self.image = image

    def _messages(self, index: int) -> tuple[list[dict], list[Any]]:
        return self.messages, [self.image]


def build_prompt(tokenizer: VQATokenizer, image: Any, prompt: str, *, tile_size: int, patch_size: int,
                 max_num_tiles: int = 1) -> dict[str, Any]:
    """One generation sample (tokens end with ``<|assistant|>``) for an image (path, PIL or tensor) and a
    question; ``<|image|>`` is put in front of the question unless the question places it."""
    dataset = _SingleImagePrompt(tokenizer, image, prompt, tile_size=tile_size, patch_size=patch_size,
                                 max_num_tiles=max_num_tiles)
    return dataset.prompt_sample(0)[0]


# ---- built-in task ---------------------------------------------------------------------------------------------
QUESTION_TYPES = ("colour", "shape", "count", "size")
_NUMBERS = ("zero", "one", "two", "three", "four")


def make_question(objects: Sequence[Mapping[str, Any]], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A question about the scene with exactly one right short answer, or None when ``kind`` has none here."""
    def unique(key: str) -> list[Mapping[str, Any]]:
        return [o for o in objects if sum(p[key] == o[key] for p in objects) == 1]

    if kind == "colour":
        candidates = unique("shape")
        if candidates:
            obj = rng.choice(candidates)
            return f"what colour is the {obj['shape']}?", obj["colour"]
    elif kind == "shape":
        candidates = unique("colour")
        if candidates:
            obj = rng.choice(candidates)
            return f"what shape is the {obj['colour']} object?", obj["shape"]
    elif kind == "size":
        candidates = [o for o in objects
                      if sum((p["colour"], p["shape"]) == (o["colour"], o["shape"]) for p in objects) == 1]
        if candidates:
            obj = rng.choice(candidates)
            return f"what size is the {obj['colour']} {obj['shape']}?", obj["size"]
    elif kind == "count":
        return "how many objects are there?", _NUMBERS[len(objects)]
    else:
        raise ConfigError(f"dataset.question_types: unknown {kind!r}; choose from {list(QUESTION_TYPES)}")
    return None


class ShapesVQA(_VQABase):
    """Built-in VQA over generated shapes: one image per sample, one question, a one-word answer.

    Args:
        split: "train", "validation" or "test" (disjoint scenes).
        num_samples: samples in this split.
        tokenizer: a :class:`VQATokenizer`.
        image_size: image side = tile size (one tile per image).
        patch_size: encoder patch size (for the cross-attention mask width).
        max_objects: each scene has 1..max_objects objects.
        question_types: subset of ("colour", "shape", "count", "size").
        seed: scenes and questions are a function of (seed, split, index).
        colours, shapes, sizes: vocabulary of the scenes (see ``mmtrain.data.shapes``).
    """

    def __init__(
        self,
        split: str,
        num_samples: int,
        tokenizer: VQATokenizer,
        *,
        image_size: int = 32,
        patch_size: int = 8,
        max_objects: int = 2,
        question_types: Sequence[str] = ("colour", "shape"),
        seed: int = 0,
        colours: Sequence[str] | None = None,
        shapes: Sequence[str] | None = None,
        sizes: Sequence[str] | None = None,
    ) -> None:
        from mmtrain.data import shapes as shapes_module

        super().__init__(tokenizer, tile_size=image_size, patch_size=patch_size, max_num_tiles=1)
        if num_samples < 1:
            raise ConfigError(f"dataset.num_samples: must be at least 1 for split {split!r}, got {num_samples}")
        if max_objects < 1:
            raise ConfigError(f"dataset.max_objects: must be at least 1, got {max_objects}")
        question_types = list(question_types)
        for kind in question_types:
            if kind not in QUESTION_TYPES:
                raise ConfigError(f"dataset.question_types: unknown {kind!r}; choose from {list(QUESTION_TYPES)}")
        render_kwargs: dict[str, Any] = {"seed": seed}
        for key, value in (("colours", colours), ("shapes", shapes), ("sizes", sizes)):
            if value is not None:
                render_kwargs[key] = tuple(value)
        self.split = split
        images = np.empty((num_samples, image_size, image_size, 3), dtype=np.uint8)
        self.questions: list[tuple[str, str]] = []
        for index in range(num_samples):
            rng = random.Random(f"vqa/{seed}/{split}/{index}")
            num_objects = rng.randint(1, max_objects)
            image, objects, _ = shapes_module.render_scene(index, split, image_size, num_objects=num_objects,
                                                           **render_kwargs)
            images[index] = np.asarray(image)
            kinds = question_types[:]
            rng.shuffle(kinds)
            qa = next((q for q in (make_question(objects, k, rng) for k in kinds) if q is not None), None)
            if qa is None:  # "count" always has an answer; otherwise fall back to it
                qa = make_question(objects, "count", rng)
            self.questions.append(qa)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, H, W)

    def __len__(self) -> int:
        return len(self.questions)

    def _messages(self, index: int) -> tuple[list[dict], list[Any]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        question, answer = self.questions[index]
        messages = [{"role": "user", "content": IMAGE_TOKEN + question}, {"role": "assistant", "content": answer}]
        return messages, [self.images[index]]


def shapes_vqa_dataset(
    split: str,
    tokenizer: VQATokenizer,
    *,
    train_samples: int = 2048,
    validation_samples: int = 128,
    image_size: int = 32,
    patch_size: int = 8,
    max_objects: int = 2,
    question_types: Sequence[str] = ("colour", "shape"),
    seed: int = 0,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    sizes: Sequence[str] | None = None,
) -> ShapesVQA:
    """Config builder: ``instantiate(cfg.dataset, split="train"|"validation", tokenizer=tok)``."""
    counts = {"train": train_samples, "validation": validation_samples, "test": validation_samples}
    if split not in counts:
        raise ConfigError(f"dataset.split: unknown split {split!r}; choose from {list(counts)}")
    return ShapesVQA(split, counts[split], tokenizer, image_size=image_size, patch_size=patch_size,
                     max_objects=max_objects, question_types=list(question_types), seed=seed,
                     colours=plain_container(colours), shapes=plain_container(shapes),
                     sizes=plain_container(sizes))


# ---- local chat datasets ---------------------------------------------------------------------------------------
class ChatVQADataset(_VQABase):
    """User/assistant conversations with images from a local JSON/JSONL file, loaded with ``datasets``.

    Args:
        data_files: path of the JSONL (or JSON) file.
        tokenizer: a :class:`VQATokenizer` or ``mmtrain.data.llama3_tokenizer.Llama3VisionTokenizer``.
        image_dir: folder that relative image paths are resolved against (default: the data file's folder).
        tile_size, patch_size, max_num_tiles: image tiling (see ``CLIPImageTransform``).
        source: ``datasets`` builder name ("json").
    """

    def __init__(self, data_files: str, tokenizer: VQATokenizer, *, image_dir: str | None = None,
                 tile_size: int = 32, patch_size: int = 8, max_num_tiles: int = 1, source: str = "json") -> None:
        import datasets

        super().__init__(tokenizer, tile_size=tile_size, patch_size=patch_size, max_num_tiles=max_num_tiles)
        path = Path(data_files)
        if not path.is_file():
            raise DataError(f"dataset.data_files: {path} does not exist")
        if source == "json" and path.suffix == ".jsonl":
            _check_jsonl_lines(path)
        try:
            self.rows = datasets.load_dataset(source, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for malformed files
            raise DataError(f"{path}: cannot be read as {source} ({str(err).splitlines()[0]})") from err
        if "messages" not in self.rows.column_names:
            raise DataError(f"{path}: rows need a 'messages' field (got {self.rows.column_names})")
        self.path = path
        self.image_dir = Path(image_dir) if image_dir else path.parent

    def __len__(self) -> int:
        return len(self.rows)

    def _messages(self, index: int) -> tuple[list[dict], list[Any]]:
        row = self.rows[index]
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
            raise DataError(f"{self.path} row {index}: 'messages' must be a list of {{role, content}}")
        images = row.get("images") or ([row["image"]] if row.get("image") else [])
        paths = [p if os.path.isabs(p) else str(self.image_dir / p) for p in images]
        root = self.image_dir.resolve()
        for relative, p in zip(images, paths):
            # A relative name is a place inside the data folder; "../" or a symlink must not lead out of it.
            if not os.path.isabs(relative) and not Path(p).resolve().is_relative_to(root):
                raise DataError(f"{self.path} row {index}: image {relative} leads outside {self.image_dir}")
        for p in paths:
            if not os.path.isfile(p):
                raise DataError(f"{self.path} row {index}: image {p} does not exist")
        n_image_tokens = sum(_content_text(m["content"]).count(IMAGE_TOKEN) for m in messages)
        if n_image_tokens != len(paths):
            raise DataError(f"{self.path} row {index}: {n_image_tokens} {IMAGE_TOKEN} tokens but {len(paths)} images")
        return [dict(m) for m in messages], paths


def _check_jsonl_lines(path: Path) -> None:
    """Name the first line that is not a JSON object: ``datasets`` reports a malformed JSONL file without a line
    number, after logging its own multi-line error."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_number}: cannot be read: not UTF-8 text") from None
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_number}: cannot be read as JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: cannot be read: expected a JSON object per line, "
                                f"got {type(row).__name__}")


def chat_vqa_dataset(split: str, tokenizer: VQATokenizer, *, train_files: str,
                     validation_files: str | None = None, image_dir: str | None = None, tile_size: int = 32,
                     patch_size: int = 8, max_num_tiles: int = 1) -> ChatVQADataset:
    """Config builder: ``train_files`` / ``validation_files`` JSONL paths (validation defaults to train)."""
    files = {"train": train_files, "validation": validation_files or train_files}
    if split not in files:
        raise ConfigError(f"dataset.split: unknown split {split!r}; choose from {list(files)}")
    return ChatVQADataset(files[split], tokenizer, image_dir=image_dir, tile_size=tile_size, patch_size=patch_size,
                          max_num_tiles=max_num_tiles)
