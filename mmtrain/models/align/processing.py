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

# PIL resampling codes (as HF configs store them) -> torchvision interpolation names. PIL's NEAREST picks the source
# pixel whose centre is nearest, which is torchvision's NEAREST_EXACT (its NEAREST rounds down, like OpenCV).
_RESAMPLE = {0: "NEAREST_EXACT", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
# Images of 1 or 3 channels: the axis of that size is the channel axis (HF's infer_channel_dimension_format).
_INFERABLE_CHANNELS = (1, 3)

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

    Accepts PIL images and uint8/float numpy arrays or torch tensors (HWC or CHW, inferred as HF does), one, a
    list, or a 4-D batch.
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
    def _as_chw(image: Any, input_data_format: str | None) -> torch.Tensor:
        """One image -> a (3, H, W) tensor (uint8 or float, as given). PIL images are converted to RGB; a numpy
        array or torch tensor of 2 dims is (H, W), of 3 dims channels-first or -last as ``input_data_format``
        says, else the axis of size 1 or 3 (the first when both are, as HF does)."""
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow is a dependency
            Image = None  # type: ignore[assignment]
        if Image is not None and isinstance(image, Image.Image):
            image, input_data_format = np.asarray(image.convert("RGB")), "channels_last"
        if isinstance(image, torch.Tensor):
            tensor = image
        else:
            tensor = torch.from_numpy(np.array(np.asarray(image), copy=True))
        if tensor.ndim == 2:
            tensor, input_data_format = tensor.unsqueeze(0), "channels_first"
        if tensor.ndim != 3:
            raise ValueError(f"an image has 2 (H, W) or 3 (C, H, W / H, W, C) dimensions, got {tuple(tensor.shape)}")
        if input_data_format is None:
            input_data_format = _infer_channel_format(tuple(tensor.shape))
        if input_data_format == "channels_last":
            tensor = tensor.permute(2, 0, 1)
        if tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1)
        return tensor

    def preprocess(self, images: Any, return_tensors: str | None = None, input_data_format: Any = None,
                   **overrides: Any) -> BatchFeature:
        """``images``: one image, a list of images, or a batch as one 4-D array / tensor (N, C, H, W) or
        (N, H, W, C). ``input_data_format``: "channels_first" or "channels_last" (HF's ``ChannelDimension`` too)
        for arrays and tensors; inferred per image when None. ``overrides``: any constructor option, for this
        call only. ``return_tensors``: None (a list of per-image tensors, HF's default), "pt" or "np"."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        unknown = sorted(set(overrides) - set(vars(self)))
        if unknown:
            raise TypeError(f"{type(self).__name__}.preprocess got unexpected keyword arguments {unknown}")
        input_data_format = _channel_format_name(input_data_format)
        opts = {**vars(self), **overrides}
        if not isinstance(images, (list, tuple)):
            images = [images]
        flat: list[Any] = []
        for image in images:
            if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
                flat.extend(image[i] for i in range(image.shape[0]))
            else:
                flat.append(image)
        out = []
        for image in flat:
            x = self._as_chw(image, input_data_format)
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


def _channel_format_name(value: Any) -> str | None:
    """None, "channels_first"/"channels_last", or HF's ChannelDimension enum (whose value is that string)."""
    name = getattr(value, "value", value)
    if name not in (None, "channels_first", "channels_last"):
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {value!r}")
    return name


def _infer_channel_format(shape: tuple[int, ...]) -> str:
    if shape[0] in _INFERABLE_CHANNELS:
        return "channels_first"
    if shape[-1] in _INFERABLE_CHANNELS:
        return "channels_last"
    raise ValueError(f"cannot tell the channel axis of an image of shape {shape} (neither the first nor the last "
                     "axis has 1 or 3 entries); pass input_data_format='channels_first' or 'channels_last'")


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


_TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")
_PAIR_TEXT_ERROR = "`text` must be a string or list of strings"


def _padding_strategy(padding: bool | str | None) -> str | None:
    """HF's padding argument -> "longest", "max_length" or None (no padding)."""
    padding = getattr(padding, "value", padding)  # HF's PaddingStrategy enum
    if padding is True or padding == "longest":
        return "longest"
    if padding == "max_length":
        return "max_length"
    if padding in (False, None, "do_not_pad"):
        return None
    raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")


def _truncation_strategy(truncation: bool | str | None) -> str | None:
    """HF's truncation argument -> a strategy name or None (no truncation)."""
    truncation = getattr(truncation, "value", truncation)  # HF's TruncationStrategy enum
    if truncation is True:
        return "longest_first"
    if truncation in (False, None, "do_not_truncate"):
        return None
    if truncation in _TRUNCATION_STRATEGIES:
        return str(truncation)
    raise ValueError(f"truncation must be True, False or one of {_TRUNCATION_STRATEGIES + ('do_not_truncate',)}, "
                     f"got {truncation!r}")


def _is_text_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item)


class BertTokenizer:
    """BERT WordPiece tokenizer from local files via ``tokenizers``, called like HF's ``BertTokenizerFast``:
    ``tokenizer.json`` when present, else ``vocab.txt`` with ``tokenizer_config.json``'s ``do_lower_case``,
    ``strip_accents`` and ``tokenize_chinese_chars`` (special tokens stay whole, as in HF).

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (BERT normalizer, pre-tokenizer, WordPiece, [CLS]/[SEP] processing).
        model_max_length: longest sequence when ``max_length`` is needed but not given.
        settings: the rest of ``tokenizer_config.json`` (special tokens, ...), written back by ``save_pretrained``.

    Padding and truncation presets stored in ``tokenizer.json`` are not applied to calls (HF's fast tokenizer
    resets them per call too); as in HF they become ``init_kwargs`` (``max_length``, ``padding_side``, ...), which
    ``AlignProcessor`` uses as its defaults, set ``padding_side``/``truncation_side``, and are written back by
    ``save_pretrained``.
    """

    def __init__(self, tokenizer: Any, model_max_length: int = 512, settings: dict[str, Any] | None = None) -> None:
        self._tokenizer = tokenizer
        self._json_truncation = tokenizer.truncation
        self._json_padding = tokenizer.padding
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
        self.init_kwargs = self._init_kwargs()
        self.padding_side = str(self.init_kwargs.get("padding_side") or "right")
        self.truncation_side = str(self.init_kwargs.get("truncation_side") or "right")

    def _init_kwargs(self) -> dict[str, Any]:
        """tokenizer_config.json's entries, then tokenizer.json's presets where the config has no entry (HF's
        order: the truncation preset's max_length before the padding preset's length)."""
        kwargs = dict(self.settings)
        if self._json_truncation is not None:
            kwargs.setdefault("max_length", self._json_truncation["max_length"])
            kwargs.setdefault("truncation_side", self._json_truncation["direction"])
            kwargs.setdefault("stride", self._json_truncation["stride"])
            kwargs.setdefault("truncation_strategy", self._json_truncation["strategy"])
        if self._json_padding is not None:
            kwargs.setdefault("pad_token", self._json_padding["pad_token"])
            kwargs.setdefault("pad_token_type_id", self._json_padding["pad_type_id"])
            kwargs.setdefault("padding_side", self._json_padding["direction"])
            kwargs.setdefault("max_length", self._json_padding["length"])
            kwargs.setdefault("pad_to_multiple_of", self._json_padding["pad_to_multiple_of"])
        return kwargs

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
                return cls(cls._from_vocab(vocab, settings), max_len, settings)
        except Exception as err:
            raise CheckpointError(f"{directory}: cannot read the tokenizer ({str(err).splitlines()[0]})") from None
        raise CheckpointError(f"{directory}: no tokenizer.json or vocab.txt")

    def save_pretrained(self, directory: str | os.PathLike, processor_class: str | None = None) -> list[str]:
        """Write ``tokenizer.json`` (with the padding/truncation presets it was read with), ``vocab.txt``
        (WordPiece models), ``tokenizer_config.json`` and ``special_tokens_map.json`` as HF's ``BertTokenizerFast``
        does; returns the files written."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        written = [os.path.join(directory, "tokenizer.json")]
        self._tokenizer.save(written[0])
        if self._json_truncation is not None or self._json_padding is not None:
            self._save_presets(written[0])
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

    def _save_presets(self, path: str) -> None:
        """Rewrite ``path`` through a copy of the tokenizer carrying the presets (this one keeps none)."""
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(self._tokenizer.to_str())
        if self._json_truncation is not None:
            copy.enable_truncation(**self._json_truncation)
        if self._json_padding is not None:
            copy.enable_padding(**self._json_padding)
        copy.save(path)

    @staticmethod
    def _from_vocab(vocab_path: str, settings: dict[str, Any]) -> Any:
        """HF's BertTokenizerFast built from vocab.txt: its normalizer options and special tokens matched whole."""
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece

        special = {key: _token_content(settings.get(key, default)) for key, default in SPECIAL_TOKENS.items()}
        tokenizer = Tokenizer(WordPiece.from_file(vocab_path, unk_token=special["unk_token"]))
        strip_accents = settings.get("strip_accents")
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
            strip_accents=None if strip_accents is None else bool(strip_accents),
            lowercase=bool(settings.get("do_lower_case", True)))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = tokenizer.token_to_id(special["cls_token"]), tokenizer.token_to_id(special["sep_token"])
        if cls_id is None or sep_id is None:
            raise ValueError(f"{vocab_path} lacks {special['cls_token']} or {special['sep_token']}")
        tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                      for token in special.values()])
        tokenizer.post_processor = processors.BertProcessing((special["sep_token"], sep_id),
                                                             (special["cls_token"], cls_id))
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        return tokenizer

    def __call__(
        self,
        text: str | Sequence[str] | Sequence[tuple[str, str]],
        text_pair: str | Sequence[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
    ) -> BatchFeature:
        """HF's tokenizer call: ``text`` one string, a list of strings, or a list of (text, text_pair) tuples;
        ``text_pair`` the second segments. Defaults and rules as HF's: no padding, no truncation unless asked
        (or ``max_length`` is given without ``padding``), ``truncation=True`` is ``"longest_first"``,
        ``max_length`` None means ``model_max_length`` where one is needed, ``return_tensors`` None gives lists
        (flat for a single string)."""
        batched = not isinstance(text, str)
        if text_pair is not None and isinstance(text_pair, str) == batched:
            raise ValueError("text and text_pair must both be single strings or both lists")
        texts = [text] if not batched else list(text)
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs")
            inputs: list[Any] = list(zip(texts, pairs))
        else:
            inputs = [tuple(t) if _is_text_pair(t) else t for t in texts]
        if not all(isinstance(t, (str, tuple)) for t in inputs):
            raise ValueError("text must be a string, a list of strings or a list of (text, text_pair) tuples")
        side = padding_side if padding_side is not None else self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"  # HF: max_length alone asks for truncation
        pad = _padding_strategy(padding)
        strategy = _truncation_strategy(truncation)
        if max_length is None and (pad == "max_length" or strategy is not None):
            max_length = self.model_max_length
        if (strategy is not None and pad is not None and pad_to_multiple_of is not None
                and max_length % pad_to_multiple_of != 0):
            raise ValueError(f"Truncation and padding are both activated but truncation length ({max_length}) is "
                             f"not a multiple of pad_to_multiple_of ({pad_to_multiple_of}).")

        if strategy is not None:
            self._tokenizer.enable_truncation(max_length, strategy=strategy, direction=self.truncation_side)
        try:
            encodings = self._tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)
        except Exception as err:  # the Rust library's truncation errors
            raise ValueError(str(err)) from None
        finally:
            self._tokenizer.no_truncation()

        ids = [list(enc.ids) for enc in encodings]
        types = [list(enc.type_ids) for enc in encodings]
        masks = [[1] * len(x) for x in ids]
        if pad is not None:
            target = max(len(x) for x in ids) if pad == "longest" else max_length
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            for seq_ids, seq_types, seq_mask in zip(ids, types, masks):
                missing = max(target - len(seq_ids), 0)
                at = 0 if side == "left" else len(seq_ids)
                seq_ids[at:at] = [self.pad_token_id] * missing
                seq_types[at:at] = [0] * missing
                seq_mask[at:at] = [0] * missing
        data: dict[str, list] = {"input_ids": ids}
        if return_token_type_ids is None or return_token_type_ids:
            data["token_type_ids"] = types
        if return_attention_mask is None or return_attention_mask:
            data["attention_mask"] = masks
        if return_tensors is None:
            return BatchFeature({k: v if batched else v[0] for k, v in data.items()})
        if len({len(x) for x in ids}) > 1:
            raise ValueError("Unable to create tensors from sequences of different lengths: pass padding=True or "
                             "'max_length' (and truncation=True to cap the length)")
        if return_tensors == "pt":
            return BatchFeature({k: torch.tensor(v, dtype=torch.long) for k, v in data.items()})
        if return_tensors == "np":
            return BatchFeature({k: np.asarray(v, dtype=np.int64) for k, v in data.items()})
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

    def decode(self, token_ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]] | torch.Tensor,
                     skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]


# Tokenizer call options the processor forwards (HF's TextKwargs that BertTokenizer.__call__ takes).
_TEXT_OPTIONS = ("text_pair", "add_special_tokens", "padding", "truncation", "max_length", "pad_to_multiple_of",
                 "padding_side", "return_token_type_ids", "return_attention_mask")
# HF's options for the image processor beyond its own settings.
_IMAGE_CALL_OPTIONS = ("input_data_format",)


class AlignProcessor:
    """Images -> ``pixel_values``; text -> ``input_ids``, ``token_type_ids``, ``attention_mask``.

    Text options, lowest priority first (HF's ``ProcessorMixin`` order): ``padding="max_length"``,
    ``max_length=64`` (HF's AlignProcessor defaults; no truncation), then the tokenizer's ``init_kwargs`` (e.g. a
    ``max_length`` preset in tokenizer.json), then the call's keyword arguments (or ``text_kwargs={...}``).
    Image options: any ``EfficientNetImageProcessor`` setting and ``input_data_format`` (or
    ``images_kwargs={...}``). ``return_tensors`` (None: lists, HF's default) goes to both. Any other keyword is a
    TypeError (HF warns and ignores it).

    Args:
        image_processor: an ``EfficientNetImageProcessor`` (align-base's settings when None).
        tokenizer: a ``BertTokenizer`` (required).
    """

    text_defaults: dict[str, Any] = {"padding": "max_length", "max_length": 64}

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
                 return_tensors: str | None = None, text_kwargs: dict[str, Any] | None = None,
                 images_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> BatchFeature:
        if text is None and images is None:
            raise ValueError("You have to specify either text or images. Both cannot be none.")
        image_options = set(vars(self.image_processor)) | set(_IMAGE_CALL_OPTIONS)
        unknown = sorted(k for k in kwargs if k not in _TEXT_OPTIONS and k not in image_options)
        unknown += sorted(f"text_kwargs[{k!r}]" for k in (text_kwargs or {}) if k not in _TEXT_OPTIONS)
        unknown += sorted(f"images_kwargs[{k!r}]" for k in (images_kwargs or {}) if k not in image_options)
        if unknown:
            raise TypeError(f"AlignProcessor got unexpected keyword arguments {unknown}; text options are "
                            f"{list(_TEXT_OPTIONS)}, image options are {sorted(image_options)}")
        out = BatchFeature()
        if text is not None:
            if not (isinstance(text, str) or (isinstance(text, (list, tuple))
                                              and all(isinstance(t, str) for t in text))):
                raise ValueError(_PAIR_TEXT_ERROR)  # as HF: pairs go in text_pair=
            options = dict(self.text_defaults)
            options.update({k: getattr(self.tokenizer, k, v) for k, v in self.tokenizer.init_kwargs.items()
                            if k in _TEXT_OPTIONS})
            options.update(text_kwargs or {})
            options.update({k: v for k, v in kwargs.items() if k in _TEXT_OPTIONS})
            out.update(self.tokenizer(text, return_tensors=return_tensors, **options))
        if images is not None:
            options = {**(images_kwargs or {}), **{k: v for k, v in kwargs.items() if k in image_options}}
            out.update(self.image_processor(images, return_tensors=return_tensors, **options))
        return out

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "token_type_ids", "attention_mask", "pixel_values"]
