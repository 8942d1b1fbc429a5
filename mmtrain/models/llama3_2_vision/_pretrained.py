"""Start a fusion model from published or earlier weights (the ``pretrained`` key of ``vlm_finetune``).

``path`` may be:
- a Hugging Face Llama-3.2-Vision folder (``config.json`` with ``model_type: mllama`` and ``model*.safetensors``),
  converted to torchtune's keys by ``hf_to_mmtrain``;
- a folder holding ``model.safetensors`` with torchtune's keys (an export of ``vlm_finetune``, whose LoRA runs export
  merged weights);
- one ``.safetensors`` file with torchtune's keys;
- Meta's own format: the ``original/`` folder of the published repositories (``consolidated.pth``), or that ``.pth``
  file, converted by ``meta_to_mmtrain`` (only tensors are unpickled).

Every weight of the model must be present except LoRA adapters (``*.lora_a.weight`` (rank, in), ``*.lora_b.weight``
(out, rank)), which keep their initialisation (``lora_b`` zero: the adapted model starts as the loaded one), and DoRA
magnitudes (``*.magnitude`` (out,)), which are set from the loaded weights; an extra or mis-shaped tensor is an error
too, so a checkpoint for another model size never half-loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from mmtrain.errors import ConfigError

__all__ = ["load_pretrained"]

_ADAPTER_SUFFIXES = (".lora_a.weight", ".lora_b.weight", ".magnitude")


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load_file

    if path.is_file():
        if path.suffix == ".pth":
            return _read_meta(path), "Meta checkpoint"
        if path.suffix != ".safetensors":
            raise ConfigError(f"pretrained={path}: expected a .safetensors or Meta .pth file, or a folder")
        return load_file(str(path)), "safetensors file"
    config = path / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"pretrained={path}: unreadable config.json ({e})") from None
        if model_type == "mllama":
            from mmtrain.models.llama3_2_vision._convert_weights import load_hf_checkpoint

            try:
                state_dict, _ = load_hf_checkpoint(path)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"pretrained={path}: {e}") from None
            return state_dict, "Hugging Face Llama-3.2-Vision checkpoint"
    weights = path / "model.safetensors"
    if weights.is_file():
        return load_file(str(weights)), "model.safetensors"
    if any(path.glob("consolidated*.pth")):
        return _read_meta(path), "Meta checkpoint"
    raise ConfigError(f"pretrained={path}: no model.safetensors, no Meta consolidated.pth, and no config.json of a "
                      "Hugging Face Llama-3.2-Vision (model_type mllama) checkpoint")


def _read_meta(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    from mmtrain.models.llama3_2_vision._convert_meta_weights import load_meta_checkpoint

    try:
        return load_meta_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"pretrained={path}: {e}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # weights_only refused an object, or a torn file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"pretrained={path}: not a checkpoint of tensors only, or unreadable ({first_line})") from None


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> str:
    """Copy the weights at ``path`` into ``model`` (in place, cast to each parameter's dtype and device); returns a
    one-line description for the log. A missing, extra or mis-shaped tensor raises ConfigError naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"pretrained={path}: no such file or folder")
    state_dict, kind = _read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(_ADAPTER_SUFFIXES)]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's weights missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} not in the model (first: {unexpected[0]})")
        raise ConfigError(f"pretrained={path}: {'; '.join(parts)}: weights for another model or size?")
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConfigError(f"pretrained={path}: {key} has shape {tuple(value.shape)}, the model "
                              f"{tuple(expected[key].shape)}: weights for another model size?")
    model.load_state_dict(state_dict, strict=False)
    _initialize_unloaded_dora_magnitudes(model, set(state_dict))
    return f"loaded {len(state_dict)} tensors from {path} ({kind})"


def _initialize_unloaded_dora_magnitudes(model: nn.Module, loaded: set[str]) -> None:
    """DoRA's magnitudes are the row norms of the adapted weights: those the file did not hold are set again from
    the weights just loaded (state-dict keys can differ from module names, so each layer is found through its
    magnitude parameter)."""
    from mmtrain.modules.lora import DoRALinear

    layer_of = {id(m.magnitude): m for m in model.modules() if isinstance(m, DoRALinear)}
    for key, value in model.state_dict(keep_vars=True).items():
        layer = layer_of.get(id(value))
        if layer is not None and key not in loaded:
            layer.initialize_dora_magnitude()
