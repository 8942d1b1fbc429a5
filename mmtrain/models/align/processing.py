"""``AlignProcessor``: the EfficientNet image processor and a BERT WordPiece tokenizer (``tokenizers`` library,
local files only), as HF transformers' ``AlignProcessor`` combines them.

Shapes (``return_tensors="pt"``):
    pixel_values:   (N_images, 3, crop_h, crop_w) float32 (or resize size when ``do_center_crop`` is off)
    input_ids, token_type_ids, attention_mask: (N_texts, max_length) int64 with ``padding="max_length"``

``save_pretrained(dir)`` writes HF's layout, readable by ``from_pretrained`` here and by transformers 4.x and 5.x:
    preprocessor_config.json  the image processor's settings (what transformers 4.x writes and reads)
    processor_config.json     {"image_processor": {...}, "processor_class": "AlignProcessor"} (transformers 5.x;
                              it takes precedence over preprocessor_config.json when both exist, as in HF)
    tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from mmtrain.errors import CheckpointError
from mmtrain.models.align.configuration import check_local_folder

IMAGENET_STANDARD_MEAN = [0.5, 0.5, 0.5]
IMAGENET_STANDARD_STD = [0.5, 0.5, 0.5]

# kakaobrain/align-base's preprocessor_config.json: 346 bilinear, center crop 289, x / 127.5 - 1, nothing else.
ALIGN_BASE_IMAGE_PROCESSOR: dict[str, Any] = {
    "do_resize": True,
    "size": {"height": 346, "width": 346},
    "resample": 2,
    "do_center_crop": True,
    "crop_size": {"height": 289, "width": 289},
    "do_rescale": True,
    "rescale_factor": 1 / 127.5,
    "rescale_offset": True,
    "do_normalize": False,
    "include_top": False,
}

# PIL resampling codes (as HF configs store them) -> torchvision interpolation names
_RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}

IMAGE_PROCESSOR_NAME = "preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"
# Keys HF adds to a saved image processor dict that are not constructor options.
_NOT_IMAGE_OPTIONS = ("image_processor_type", "processor_class", "_processor_class")
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}


def _write_json(path: str, data: dict[str, Any]) -> None:
    # HF's formatting (sorted keys, indent 2, trailing newline), so diffs against HF-written folders stay small.
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(token: Any) -> str:
    """A special token as tokenizer_config.json stores it: a string or HF's AddedToken dict {"content": ...}."""
    return str(token["content"]) if isinstance(token, dict) else str(token)


def _image_processor_settings(directory: str) -> dict[str, Any] | None:
    """The saved image-processor dict: processor_config.json's "image_processor" entry (transformers 5.x, which
    prefers it), else preprocessor_config.json (4.x and the Hub's align-base), else None."""
    processor_path = os.path.join(directory, PROCESSOR_NAME)
    if os.path.isfile(processor_path):
        nested = _read_json(processor_path).get("image_processor")
        if isinstance(nested, dict):
            return nested
    image_path = os.path.join(directory, IMAGE_PROCESSOR_NAME)
    if os.path.isfile(image_path):
        return _read_json(image_path)
    return None


class BatchFeature(dict):
    """A dict with attribute access (``out.pixel_values``), like HF's ``BatchFeature``/``BatchEncoding``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _to_tensor_list(data: dict[str, list], return_tensors: str | None) -> BatchFeature:
    if return_tensors in (None, "list"):
        return BatchFeature(data)
    if return_tensors == "pt":
        return BatchFeature({k: torch.stack(v) if isinstance(v[0], torch.Tensor) else torch.tensor(v)
                             for k, v in data.items()})
    if return_tensors == "np":
        return BatchFeature({k: np.stack([np.asarray(x) for x in v]) for k, v in data.items()})
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")


class EfficientNetImageProcessor:
    """HF's ``EfficientNetImageProcessor`` options and defaults: resize -> center crop -> rescale (optionally with
    offset: ``x * rescale_factor - 1``) -> normalize -> ``include_top`` (divide by ``image_std`` once more).

    Accepts PIL images, HWC uint8 numpy arrays and CHW uint8/float torch tensors, one or a list.
    Resizing runs on uint8 tensors with antialiasing, as HF's torchvision backend does.
    """

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: int = 3,
        do_center_crop: bool = False,
        crop_size: dict[str, int] | None = None,
        rescale_factor: float = 1 / 255,
        rescale_offset: bool = False,
        do_rescale: bool = True,
        do_normalize: bool = True,
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
        include_top: bool = True,
        **kwargs: Any,
    ) -> None:
        self.do_resize = do_resize
        self.size = dict(size) if size is not None else {"height": 346, "width": 346}
        self.resample = int(resample)
        self.do_center_crop = do_center_crop
        self.crop_size = dict(crop_size) if crop_size is not None else {"height": 289, "width": 289}
        self.rescale_factor = rescale_factor
        self.rescale_offset = rescale_offset
        self.do_rescale = do_rescale
        self.do_normalize = do_normalize
        self.image_mean = image_mean if image_mean is not None else list(IMAGENET_STANDARD_MEAN)
        self.image_std = image_std if image_std is not None else list(IMAGENET_STANDARD_STD)
        self.include_top = include_top
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be a PIL resampling code {sorted(_RESAMPLE)}, got {resample!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as HF's ``EfficientNetImageProcessor.to_dict()`` writes them (plus its type name)."""
        return {"image_processor_type": "EfficientNetImageProcessor",
                **{k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, (list, tuple)) else v)
                   for k, v in vars(self).items()}}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> EfficientNetImageProcessor:
        """Inverse of ``to_dict``; HF's bookkeeping keys (type, processor class) are dropped, unknown keys ignored."""
        return cls(**{k: v for k, v in config.items() if k not in _NOT_IMAGE_OPTIONS})

    def save_pretrained(self, directory: str | os.PathLike, processor_class: str | None = None) -> list[str]:
        """Write ``preprocessor_config.json`` into ``directory`` (created if missing); returns the files written."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        data = self.to_dict()
        if processor_class is not None:
            data["processor_class"] = processor_class  # as HF's ProcessorMixin (4.x) records it
        path = os.path.join(directory, IMAGE_PROCESSOR_NAME)
        _write_json(path, data)
        return [path]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> EfficientNetImageProcessor:
        """Read the settings that ``save_pretrained`` (ours or HF's, 4.x or 5.x) wrote into ``directory``."""
        directory = os.fspath(directory)
        check_local_folder(directory)
        settings = _image_processor_settings(directory)
        if settings is None:
            raise CheckpointError(f"{directory}: no {IMAGE_PROCESSOR_NAME} or {PROCESSOR_NAME} with an image processor")
        try:
            return cls.from_dict(settings)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{directory}: bad image processor settings ({err})") from None

    @staticmethod
    def _as_uint8_chw(image: Any) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            tensor = image
        else:
            try:
                from PIL import Image
            except ImportError:  # pragma: no cover - pillow is a dependency
                Image = None  # type: ignore[assignment]
            if Image is not None and isinstance(image, Image.Image):
                image = np.asarray(image.convert("RGB"))
            array = np.asarray(image)
            if array.ndim == 2:
                array = np.repeat(array[:, :, None], 3, axis=2)
            if array.ndim != 3:
                raise ValueError(f"an image is HWC or HW, got an array of shape {array.shape}")
            tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 3:
            raise ValueError(f"an image tensor is (C, H, W), got shape {tuple(tensor.shape)}")
        if tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1)
        return tensor

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **overrides: Any) -> BatchFeature:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        opts = {**vars(self), **overrides}
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for image in images:
            x = self._as_uint8_chw(image)
            if opts["do_resize"]:
                size = opts["size"]
                if "height" in size and "width" in size:
                    new_size = [size["height"], size["width"]]
                elif "shortest_edge" in size:
                    h, w = x.shape[-2:]
                    short = size["shortest_edge"]
                    new_size = [short, int(short * w / h)] if h <= w else [int(short * h / w), short]
                else:
                    raise ValueError(f"size needs 'height' and 'width' or 'shortest_edge', got {size}")
                interpolation = InterpolationMode[_RESAMPLE[int(opts["resample"])]]
                x = tvF.resize(x, new_size, interpolation=interpolation, antialias=True)
            if opts["do_center_crop"]:
                crop = opts["crop_size"]
                x = _center_crop(x, crop["height"], crop["width"])
            x = x.to(torch.float32)
            if opts["do_rescale"]:
                x = x * opts["rescale_factor"]
                if opts["rescale_offset"]:
                    x = x - 1
            mean = torch.as_tensor(opts["image_mean"], dtype=torch.float32).reshape(-1, 1, 1)
            std = torch.as_tensor(opts["image_std"], dtype=torch.float32).reshape(-1, 1, 1)
            if opts["do_normalize"]:
                x = (x - mean) / std
            if opts["include_top"]:
                x = x / std
            out.append(x)
        return _to_tensor_list({"pixel_values": out}, return_tensors)

    __call__ = preprocess


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Center crop (zero-pad first when the image is smaller), with HF's rounding of the offsets."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if height > h or width > w:
        pad_w, pad_h = max(width - w, 0), max(height - h, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
    top, left = int((h - height) / 2.0), int((w - width) / 2.0)
    return x[..., top:top + height, left:left + width]


class BertTokenizer:
    """BERT WordPiece tokenizer from local files via ``tokenizers``: ``tokenizer.json`` when present, else
    ``vocab.txt`` (+ ``do_lower_case`` from ``tokenizer_config.json``).

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (BERT normalizer, pre-tokenizer, WordPiece, [CLS]/[SEP] processing).
        model_max_length: longest sequence when ``max_length`` is not given.
        settings: the rest of ``tokenizer_config.json`` (special tokens, ...), written back by ``save_pretrained``.
    """

    def __init__(self, tokenizer: Any, model_max_length: int = 512, settings: dict[str, Any] | None = None) -> None:
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.model_max_length = model_max_length
        self.settings = dict(settings or {})
        self.special_tokens = {key: _token_content(self.settings.get(key, default))
                               for key, default in SPECIAL_TOKENS.items()}
        self.pad_token = self.special_tokens["pad_token"]
        self.pad_token_id = tokenizer.token_to_id(self.pad_token)
        if self.pad_token_id is None:
            self.pad_token_id = 0
        self.vocab_size = tokenizer.get_vocab_size()

    @property
    def do_lower_case(self) -> bool:
        """Read from the tokenizer's own normalizer when it is BERT's (what actually runs), else the config."""
        normalizer = json.loads(self._tokenizer.to_str()).get("normalizer") or {}
        if normalizer.get("type") == "BertNormalizer":
            return bool(normalizer.get("lowercase", True))
        return bool(self.settings.get("do_lower_case", True))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> BertTokenizer:
        from tokenizers import Tokenizer

        directory = os.fspath(directory)
        check_local_folder(directory)
        settings: dict[str, Any] = {}
        special_path = os.path.join(directory, "special_tokens_map.json")
        if os.path.isfile(special_path):
            settings.update({k: v for k, v in _read_json(special_path).items() if k in SPECIAL_TOKENS})
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_path):
            settings.update(_read_json(config_path))
        # HF writes a huge sentinel (int(1e30)) when a tokenizer has no limit; BERT's positions stop at 512
        max_len = int(settings.get("model_max_length", 512)) if settings.get("model_max_length", 0) < 10**6 else 512
        tokenizer_json = os.path.join(directory, "tokenizer.json")
        vocab = os.path.join(directory, "vocab.txt")
        try:
            if os.path.isfile(tokenizer_json):
                return cls(Tokenizer.from_file(tokenizer_json), max_len, settings)
            if os.path.isfile(vocab):
                return cls(cls._from_vocab(vocab, bool(settings.get("do_lower_case", True))), max_len, settings)
        except Exception as err:
            raise CheckpointError(f"{directory}: cannot read the tokenizer ({str(err).splitlines()[0]})") from None
        raise CheckpointError(f"{directory}: no tokenizer.json or vocab.txt")

    def save_pretrained(self, directory: str | os.PathLike, processor_class: str | None = None) -> list[str]:
        """Write ``tokenizer.json``, ``vocab.txt`` (WordPiece models), ``tokenizer_config.json`` and
        ``special_tokens_map.json`` as HF's ``BertTokenizerFast`` does; returns the files written."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        written = [os.path.join(directory, "tokenizer.json")]
        self._tokenizer.save(written[0])
        model = json.loads(self._tokenizer.to_str())["model"]
        vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        by_id = sorted(vocab, key=vocab.__getitem__)
        # vocab.txt is positional: only write it when ids are exactly 0..n-1, or a reader would shift them
        if model.get("type") == "WordPiece" and [vocab[t] for t in by_id] == list(range(len(by_id))):
            written.append(os.path.join(directory, "vocab.txt"))
            with open(written[-1], "w", encoding="utf-8") as handle:
                handle.write("".join(token + "\n" for token in by_id))
        config = {k: v for k, v in self.settings.items() if k not in ("name_or_path", "auto_map")}
        config.update(self.special_tokens)
        config.update(do_lower_case=self.do_lower_case, model_max_length=self.model_max_length,
                      tokenizer_class="BertTokenizer")
        config.setdefault("do_basic_tokenize", True)
        config.setdefault("tokenize_chinese_chars", True)
        config.setdefault("strip_accents", None)
        config.setdefault("clean_up_tokenization_spaces", True)
        if processor_class is not None:
            config["processor_class"] = processor_class
        written.append(os.path.join(directory, "tokenizer_config.json"))
        _write_json(written[-1], config)
        written.append(os.path.join(directory, "special_tokens_map.json"))
        _write_json(written[-1], dict(self.special_tokens))
        return written

    @staticmethod
    def _from_vocab(vocab_path: str, lowercase: bool) -> Any:
        from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece

        tokenizer = Tokenizer(WordPiece.from_file(vocab_path, unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True,
                                                          handle_chinese_chars=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise ValueError(f"{vocab_path} lacks [CLS] or [SEP]")
        tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        return tokenizer

    def __call__(self, text: str | Sequence[str], padding: bool | str = "max_length", max_length: int | None = 64,
                 truncation: bool = True, return_tensors: str | None = "pt") -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        encodings = self._tokenizer.encode_batch(texts)
        limit = max_length or self.model_max_length
        ids, types, masks = [], [], []
        for enc in encodings:
            seq_ids, seq_types = list(enc.ids), list(enc.type_ids)
            if truncation and len(seq_ids) > limit:
                # keep [CLS] ... and end with [SEP], as a truncating BERT tokenizer does
                seq_ids = seq_ids[: limit - 1] + [seq_ids[-1]]
                seq_types = seq_types[:limit]
            ids.append(seq_ids)
            types.append(seq_types)
        if padding in (True, "longest"):
            target = max(len(x) for x in ids)
        elif padding == "max_length":
            target = limit
        elif padding in (False, "do_not_pad", None):
            target = 0
        else:
            raise ValueError(f"padding must be 'max_length', 'longest', True or False, got {padding!r}")
        for seq_ids, seq_types in zip(ids, types):
            masks.append([1] * len(seq_ids) + [0] * max(target - len(seq_ids), 0))
            seq_types.extend([0] * max(target - len(seq_types), 0))
            seq_ids.extend([self.pad_token_id] * max(target - len(seq_ids), 0))
        if return_tensors is not None and len({len(x) for x in ids}) > 1:
            raise ValueError("texts have different lengths; pass padding='max_length' or 'longest' for tensors")
        data = {"input_ids": ids, "token_type_ids": types, "attention_mask": masks}
        if return_tensors == "pt":
            return BatchFeature({k: torch.tensor(v, dtype=torch.long) for k, v in data.items()})
        return _to_tensor_list(data, return_tensors)

    def decode(self, token_ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]] | torch.Tensor,
                     skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]


class AlignProcessor:
    """Images -> ``pixel_values``; text -> ``input_ids``, ``token_type_ids``, ``attention_mask`` (max_length 64).

    Args:
        image_processor: an ``EfficientNetImageProcessor`` (align-base's settings when None).
        tokenizer: a ``BertTokenizer`` (required).
    """

    def __init__(self, image_processor: EfficientNetImageProcessor | None = None,
                 tokenizer: BertTokenizer | None = None) -> None:
        if tokenizer is None:
            raise ValueError("AlignProcessor needs a tokenizer (BertTokenizer.from_pretrained(local_dir))")
        self.image_processor = image_processor or EfficientNetImageProcessor(**ALIGN_BASE_IMAGE_PROCESSOR)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> AlignProcessor:
        """Read the image processor's settings (processor_config.json's "image_processor" entry, else
        preprocessor_config.json, else align-base's) and the tokenizer files from a local folder."""
        directory = os.fspath(directory)
        check_local_folder(directory)
        settings = _image_processor_settings(directory)
        image_processor = None
        if settings is not None:
            try:
                image_processor = EfficientNetImageProcessor.from_dict(settings)
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"{directory}: bad image processor settings ({err})") from None
        return cls(image_processor, BertTokenizer.from_pretrained(directory))

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write HF's processor layout (see the module docstring) into ``directory``; returns the files written.

        Both image-processor files are written from the same settings: transformers 5.x reads processor_config.json,
        4.x reads preprocessor_config.json.
        """
        directory = os.fspath(directory)
        written = self.image_processor.save_pretrained(directory, processor_class=type(self).__name__)
        written += self.tokenizer.save_pretrained(directory, processor_class=type(self).__name__)
        written.append(os.path.join(directory, PROCESSOR_NAME))
        _write_json(written[-1], {"image_processor": self.image_processor.to_dict(),
                                  "processor_class": type(self).__name__})
        return written

    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None,
                 return_tensors: str | None = "pt", padding: bool | str = "max_length", max_length: int = 64,
                 truncation: bool = True, **image_kwargs: Any) -> BatchFeature:
        if text is None and images is None:
            raise ValueError("You have to specify either text or images. Both cannot be none.")
        out = BatchFeature()
        if text is not None:
            out.update(self.tokenizer(text, padding=padding, max_length=max_length, truncation=truncation,
                                      return_tensors=return_tensors))
        if images is not None:
            out.update(self.image_processor(images, return_tensors=return_tensors, **image_kwargs))
        return out

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "token_type_ids", "attention_mask", "pixel_values"]
