"""HF-layout checkpoints for the ALIGN models: ``config.json`` + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``).

Keys on disk are always HF's. The only internal names that differ are in the BERT self-attention:

    HF                                            mmtrain
    encoder.layer.N.attention.self.query          encoder.layer.N.attention.attn.q_proj
    encoder.layer.N.attention.self.key            encoder.layer.N.attention.attn.k_proj
    encoder.layer.N.attention.self.value          encoder.layer.N.attention.attn.v_proj
    encoder.layer.N.attention.output.dense        encoder.layer.N.attention.attn.output_proj
    encoder.layer.N.attention.output.LayerNorm    encoder.layer.N.attention.norm
    encoder.layer.N.attention.self.distance_embedding   encoder.layer.N.attention.distance_embedding
                                                  (relative_key / relative_key_query only)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from torch import nn

from mmtrain.errors import CheckpointError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"

_HF_TO_INTERNAL = [
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)self\.query\."), r"\1attn.q_proj."),
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)self\.key\."), r"\1attn.k_proj."),
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)self\.value\."), r"\1attn.v_proj."),
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)output\.dense\."), r"\1attn.output_proj."),
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)output\.LayerNorm\."), r"\1norm."),
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)self\.distance_embedding\."), r"\1distance_embedding."),
]
_INTERNAL_TO_HF = [
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)attn\.q_proj\."), r"\1self.query."),
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)attn\.k_proj\."), r"\1self.key."),
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)attn\.v_proj\."), r"\1self.value."),
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)attn\.output_proj\."), r"\1output.dense."),
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)norm\."), r"\1output.LayerNorm."),
    (re.compile(r"(encoder\.layer\.\d+\.attention\.)distance_embedding\."), r"\1self.distance_embedding."),
]
# Buffers some checkpoints carry that we do not keep (or keep as non-persistent), and pretraining heads.
_IGNORABLE = re.compile(r"(^|\.)(position_ids|token_type_ids|num_batches_tracked)$|^(cls|lm_head|classifier)\.")


def _rename(key: str, rules: list) -> str:
    for pattern, repl in rules:
        new_key, n = pattern.subn(repl, key)
        if n:
            return new_key
    return key


def hf_to_internal(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF key names -> mmtrain's (only text self-attention keys change)."""
    return {_rename(k, _HF_TO_INTERNAL): v for k, v in state_dict.items()}


def internal_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmtrain key names -> HF's."""
    return {_rename(k, _INTERNAL_TO_HF): v for k, v in state_dict.items()}


def read_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read the weights in ``directory`` -> (HF-keyed state dict, file it came from). Never unpickles code."""
    from mmtrain.models.align.configuration import check_local_folder

    check_local_folder(directory)
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a folder (from_pretrained reads a local HF-layout folder)")
    from safetensors.torch import load_file

    safe = os.path.join(directory, SAFE_WEIGHTS_NAME)
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    binary = os.path.join(directory, WEIGHTS_NAME)
    try:
        if os.path.isfile(safe):
            return load_file(safe), safe
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(os.path.join(directory, shard)))
            return state, index
        if os.path.isfile(binary):
            state = torch.load(binary, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"{binary}: expected a state dict, got {type(state).__name__}")
            return state, binary
    except CheckpointError:
        raise
    except Exception as err:  # corrupt file, unsafe pickle, bad index
        where = safe if os.path.isfile(safe) else index if os.path.isfile(index) else binary
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{where}: cannot read weights ({message})") from None
    raise CheckpointError(f"{directory}: no {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {WEIGHTS_NAME}")


def _strip_to_model(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Select the keys of this model: a tower loads from a full AlignModel file ("text_model."/"vision_model."
    prefix) or from a bare checkpoint; a BERT from BertModel/BertFor* files ("bert." prefix)."""
    from mmtrain.models.align.text import AlignTextModel
    from mmtrain.models.align.vision import AlignVisionModel

    prefixes: tuple[str, ...] = ()
    if isinstance(model, AlignTextModel):
        prefixes = ("text_model.", "bert.")
    elif isinstance(model, AlignVisionModel):
        prefixes = ("vision_model.",)
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_hf_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load an HF-keyed state dict into ``model`` strictly: every parameter must be present with its shape.

    Unexpected keys fail too, except buffers we do not keep and pretraining heads (``cls.``, ...).
    """
    state = hf_to_internal(_strip_to_model(state, model))
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _IGNORABLE.search(k)]
    unexpected = [k for k in state if k not in own and not _IGNORABLE.search(k)]
    if missing:
        shown = ", ".join(internal_to_hf({k: None for k in missing[:4]}))  # type: ignore[dict-item]
        raise CheckpointError(f"{source}: {len(missing)} weights missing for {type(model).__name__} ({shown}"
                              f"{', ...' if len(missing) > 4 else ''})")
    if unexpected:
        shown = ", ".join(internal_to_hf({k: None for k in unexpected[:4]}))  # type: ignore[dict-item]
        raise CheckpointError(f"{source}: {len(unexpected)} weights do not belong to {type(model).__name__} "
                              f"({shown}{', ...' if len(unexpected) > 4 else ''})")
    for key, value in own.items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            hf_key = next(iter(internal_to_hf({key: None})))  # type: ignore[dict-item]
            raise CheckpointError(f"{source}: {hf_key} has shape {tuple(state[key].shape)}, the model expects "
                                  f"{tuple(value.shape)} (config.json and weights disagree?)")
    with torch.no_grad():
        for key, value in own.items():
            if key in state:
                value.copy_(state[key].to(value.dtype))


def _dtype_from_name(value: Any, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        candidate = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype):
            return candidate
    raise ValueError(f"{what} must be a torch.dtype, 'auto' or the name of a torch dtype, got {value!r}")


def resolve_load_dtype(dtype: Any, config: Any, state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype ``from_pretrained`` builds the model in (HF 5.x rules): an explicit dtype (or its name) as given;
    ``"auto"`` or None: config.json's ``dtype`` (or legacy ``torch_dtype``) entry, else the dtype of the first
    floating-point tensor in the checkpoint, else the default dtype."""
    if dtype is not None and dtype != "auto":
        return _dtype_from_name(dtype, "dtype")
    extra = getattr(config, "extra", {}) or {}
    for key in ("dtype", "torch_dtype"):
        if extra.get(key) is not None:
            return _dtype_from_name(extra[key], f"config.json's {key}")
    for tensor in state.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def load_pretrained(cls: type, directory: str | os.PathLike, config: Any = None, dtype: Any = None,
                    torch_dtype: Any = None, **kwargs: Any) -> nn.Module:
    """Build ``cls`` from ``directory``'s config.json (unless ``config`` is given) and load its weights.

    ``dtype`` (``torch_dtype`` is its older name; ``dtype`` wins when both are given): a ``torch.dtype``, its name,
    or ``"auto"`` (the default): see ``resolve_load_dtype``. Weights are never rounded through float32 first."""
    from mmtrain.models.align.configuration import (
        AlignConfig,
        AlignTextConfig,
        AlignVisionConfig,
        check_local_folder,
    )
    from mmtrain.models.align.model import AlignModel
    from mmtrain.models.align.text import AlignTextModel

    check_local_folder(directory)
    config_cls = {AlignModel: AlignConfig, AlignTextModel: AlignTextConfig}.get(cls, AlignVisionConfig)
    if config is None:
        config = config_cls.from_pretrained(directory)
    state, source = read_state_dict(directory)
    if cls is AlignTextModel and "add_pooling_layer" not in kwargs:
        stripped = _strip_to_model(state, AlignTextModel.__new__(AlignTextModel))
        kwargs["add_pooling_layer"] = any(k.startswith("pooler.") for k in stripped)
    target = resolve_load_dtype(dtype if dtype is not None else torch_dtype, config, state)
    model = cls(config, **kwargs).to(target)  # .to(dtype) leaves integer buffers (num_batches_tracked) alone
    load_hf_state_dict(model, state, source)
    return model


def save_pretrained(model: nn.Module, directory: str | os.PathLike, safe_serialization: bool = True,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``) with HF's keys.

    ``state_dict``: the weights to write (mmtrain keys), as HF's ``save_pretrained`` takes them, e.g. a full state
    dict gathered from FSDP2 shards; default ``model.state_dict()``.
    Files are written under temporary names and renamed, so an interrupted save never leaves a half file behind.
    """
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    weights = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in internal_to_hf(weights).items()}
    config_path = os.path.join(directory, "config.json")
    tmp = config_path + ".tmp"
    text = model.config.to_json_string()
    floating = next((v.dtype for v in weights.values() if v.is_floating_point()), None)
    if floating is not None:
        # HF records the weights' dtype, and "auto" loading (ours and HF's) reads it back before the weights
        saved = json.loads(text)
        saved.pop("torch_dtype", None)
        saved["dtype"] = str(floating).removeprefix("torch.")
        text = json.dumps(saved, indent=2, sort_keys=True) + "\n"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, config_path)
    name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    path = os.path.join(directory, name)
    tmp = path + ".tmp"
    if safe_serialization:
        save_file(state, tmp, metadata={"format": "pt"})
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)
