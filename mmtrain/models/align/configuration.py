"""ALIGN configurations with the arguments and defaults of HF transformers' ``AlignConfig``,
``AlignTextConfig`` and ``AlignVisionConfig``, readable from and writable to an HF ``config.json``.

Defaults give the kakaobrain/align-base architecture: BERT-base text encoder, EfficientNet-B7 vision encoder,
projection 640. No tensors here.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from typing import Any

from mmtrain.errors import CheckpointError

CONFIG_NAME = "config.json"
# "relative_key": Shaw et al. (distance embeddings added to the query side of the scores); "relative_key_query":
# Huang et al. method 4 (added on the query and the key side). Both as HF's BertSelfAttention implements them.
POSITION_EMBEDDING_TYPES = ("absolute", "relative_key", "relative_key_query")
_TRANSFORMERS_VERSION = "4.40.0"  # written into config.json so HF accepts the file; any recent version works


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_local_folder(directory: str | os.PathLike) -> None:
    """Raise a one-line ``CheckpointError`` when ``directory`` does not exist and looks like a hub id ("org/name"):
    mmtrain never downloads, so say so instead of complaining about a missing config.json."""
    path = os.fspath(directory)
    if not os.path.exists(path) and _HUB_ID.match(path):
        raise CheckpointError(
            f"{path}: no such local folder, and hub ids are not supported (mmtrain never uses the network); "
            f"download the repo (e.g. `huggingface-cli download {path} --local-dir <dir>`) and pass that folder")


# PretrainedConfig's output switches: forward() falls back to these when its own argument is None.
_OUTPUT_FLAG_DEFAULTS: dict[str, bool] = {"return_dict": True, "output_hidden_states": False,
                                          "output_attentions": False}


class _ConfigBase:
    """Plain attribute bag: known fields with defaults, unknown keys kept so that a round trip loses nothing.

    Every config also carries HF's ``return_dict`` (True), ``output_hidden_states`` (False) and
    ``output_attentions`` (False), which the models use when the matching forward argument is None.
    """

    model_type = ""
    _fields: tuple[str, ...] = ()

    return_dict: bool
    output_hidden_states: bool
    output_attentions: bool

    def __init__(self, **kwargs: Any) -> None:
        self.extra: dict[str, Any] = {}
        for key, default in _OUTPUT_FLAG_DEFAULTS.items():
            value = kwargs.pop(key, default)
            setattr(self, key, default if value is None else bool(value))
        for key, value in kwargs.items():
            if key in ("model_type", "transformers_version", "architectures", "_name_or_path"):
                continue
            if key in self._fields:
                setattr(self, key, value)
            else:
                self.extra[key] = value

    def to_dict(self) -> dict[str, Any]:
        out = {**copy.deepcopy(self.extra), **{name: copy.deepcopy(getattr(self, name)) for name in self._fields}}
        out.update({name: getattr(self, name) for name in _OUTPUT_FLAG_DEFAULTS})
        out["model_type"] = self.model_type
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any):
        return cls(**{**config, **overrides})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike):
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json in this folder") from None
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: config.json is not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: config.json must hold a JSON object")
        return cls._from_file_dict(data, str(path))

    @classmethod
    def _from_file_dict(cls, data: dict[str, Any], where: str):
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any):
        check_local_folder(directory)
        config = cls.from_json_file(os.path.join(directory, CONFIG_NAME))
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, CONFIG_NAME))

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class AlignTextConfig(_ConfigBase):
    """BERT text encoder configuration (HF ``AlignTextConfig``; also reads a plain BERT ``config.json``)."""

    model_type = "align_text_model"
    _fields = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
        "initializer_range", "layer_norm_eps", "pad_token_id", "position_embedding_type", "use_cache",
    )

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        position_embedding_type: str = "absolute",
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.pad_token_id = pad_token_id
        self.position_embedding_type = position_embedding_type
        self.use_cache = use_cache
        super().__init__(**kwargs)
        if hidden_size % num_attention_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) is not a multiple of num_attention_heads "
                             f"({num_attention_heads})")
        if position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"position_embedding_type must be one of {list(POSITION_EMBEDDING_TYPES)}, "
                             f"got {position_embedding_type!r}")

    @classmethod
    def _from_file_dict(cls, data: dict[str, Any], where: str):
        # An AlignConfig file holds the text config under "text_config"; a BERT file is the text config itself.
        if data.get("model_type") == "align" or "text_config" in data:
            data = data.get("text_config") or {}
        return cls.from_dict(data)


class AlignVisionConfig(_ConfigBase):
    """EfficientNet vision encoder configuration (HF ``AlignVisionConfig``; defaults are EfficientNet-B7)."""

    model_type = "align_vision_model"
    _fields = (
        "num_channels", "image_size", "width_coefficient", "depth_coefficient", "depth_divisor", "kernel_sizes",
        "in_channels", "out_channels", "depthwise_padding", "strides", "num_block_repeats", "expand_ratios",
        "squeeze_expansion_ratio", "hidden_act", "hidden_dim", "pooling_type", "initializer_range",
        "batch_norm_eps", "batch_norm_momentum", "drop_connect_rate",
    )

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 600,
        width_coefficient: float = 2.0,
        depth_coefficient: float = 3.1,
        depth_divisor: int = 8,
        kernel_sizes: list[int] = (3, 3, 5, 3, 5, 5, 3),
        in_channels: list[int] = (32, 16, 24, 40, 80, 112, 192),
        out_channels: list[int] = (16, 24, 40, 80, 112, 192, 320),
        depthwise_padding: list[int] = (),
        strides: list[int] = (1, 2, 2, 2, 1, 2, 1),
        num_block_repeats: list[int] = (1, 2, 2, 3, 3, 4, 1),
        expand_ratios: list[int] = (1, 6, 6, 6, 6, 6, 6),
        squeeze_expansion_ratio: float = 0.25,
        hidden_act: str = "swish",
        hidden_dim: int = 2560,
        pooling_type: str = "mean",
        initializer_range: float = 0.02,
        batch_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 0.99,
        drop_connect_rate: float = 0.2,
        **kwargs: Any,
    ) -> None:
        self.num_channels = num_channels
        self.image_size = image_size
        self.width_coefficient = width_coefficient
        self.depth_coefficient = depth_coefficient
        self.depth_divisor = depth_divisor
        self.kernel_sizes = list(kernel_sizes)
        self.in_channels = list(in_channels)
        self.out_channels = list(out_channels)
        self.depthwise_padding = list(depthwise_padding)
        self.strides = list(strides)
        self.num_block_repeats = list(num_block_repeats)
        self.expand_ratios = list(expand_ratios)
        self.squeeze_expansion_ratio = squeeze_expansion_ratio
        self.hidden_act = hidden_act
        self.hidden_dim = hidden_dim
        self.pooling_type = pooling_type
        self.initializer_range = initializer_range
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        self.drop_connect_rate = drop_connect_rate
        kwargs.pop("num_hidden_layers", None)  # derived, see the property
        super().__init__(**kwargs)
        lengths = {name: len(getattr(self, name)) for name in
                   ("kernel_sizes", "in_channels", "out_channels", "strides", "num_block_repeats", "expand_ratios")}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"AlignVisionConfig stage lists differ in length: {lengths}")
        if pooling_type not in ("mean", "max"):
            raise ValueError(f"pooling_type must be one of ['mean', 'max'], got {pooling_type!r}")

    @property
    def num_hidden_layers(self) -> int:
        """Number of MBConv blocks after depth scaling."""
        return sum(math.ceil(self.depth_coefficient * n) for n in self.num_block_repeats)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["num_hidden_layers"] = self.num_hidden_layers
        return out

    @classmethod
    def _from_file_dict(cls, data: dict[str, Any], where: str):
        if data.get("model_type") == "align" or "vision_config" in data:
            data = data.get("vision_config") or {}
        return cls.from_dict(data)


class AlignConfig(_ConfigBase):
    """The full ALIGN configuration: a text config, a vision config, ``projection_dim`` and the temperature."""

    model_type = "align"
    _fields = ("projection_dim", "temperature_init_value", "initializer_range")

    def __init__(
        self,
        text_config: dict | AlignTextConfig | None = None,
        vision_config: dict | AlignVisionConfig | None = None,
        projection_dim: int = 640,
        temperature_init_value: float = 1.0,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        if text_config is None:
            text_config = AlignTextConfig()
        elif isinstance(text_config, dict):
            text_config = AlignTextConfig.from_dict(text_config)
        if vision_config is None:
            vision_config = AlignVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = AlignVisionConfig.from_dict(vision_config)
        self.text_config: AlignTextConfig = text_config
        self.vision_config: AlignVisionConfig = vision_config
        self.projection_dim = projection_dim
        self.temperature_init_value = temperature_init_value
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @classmethod
    def from_text_vision_configs(cls, text_config: AlignTextConfig, vision_config: AlignVisionConfig,
                                 **kwargs: Any) -> AlignConfig:
        """Instantiate an ``AlignConfig`` from a text and a vision configuration."""
        return cls(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["text_config"] = self.text_config.to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["architectures"] = ["AlignModel"]
        out["transformers_version"] = _TRANSFORMERS_VERSION
        return out

    @classmethod
    def _from_file_dict(cls, data: dict[str, Any], where: str):
        if data.get("model_type", "align") != "align":
            raise CheckpointError(f"{where}: model_type is {data.get('model_type')!r}, expected 'align'")
        return cls.from_dict(data)
