"""Llama 3.2 Vision weights in Meta's own format (``consolidated.pth`` beside ``params.json``, the ``original/``
folder of the published repositories) <-> mmtrain (torchtune's keys).

``meta_to_mmtrain`` / ``mmtrain_to_meta`` are torchtune's ``llama3_vision_meta_to_tune`` /
``llama3_vision_tune_to_meta``; ``load_meta_checkpoint(path)`` reads the file (``torch.load`` with
``weights_only=True`` and ``mmap=True``: nothing but tensors is unpickled, and pages are read as they are copied).

Meta's names (``C`` a cross-attention layer, ``L`` a text layer, ``N`` a vision layer) and mmtrain's::

    text_model.tok_embeddings.weight (vocab, d)                 decoder.tok_embeddings.weight
    text_model.learnable_embedding.weight (8, d)                decoder.tok_embeddings.fusion_embedding.weight
    text_model.norm.weight, text_model.output.weight            decoder.norm.scale, decoder.output.weight
    text_model.layers.L.attention.w{q,k,v,o}.weight             decoder.layers.L.attn.{q,k,v,output}_proj.weight
    text_model.layers.L.feed_forward.w{1,2,3}.weight            decoder.layers.L.mlp.w{1,2,3}.weight
    text_model.layers.L.{attention,ffn}_norm.weight             decoder.layers.L.{sa,mlp}_norm.scale
    text_model.cross_attention_layers.C.*                       decoder.layers.M.fusion_layer.* (same renames, plus
        gate_attn, gate_ffwd (1,), attention.{q,k}_norm.weight      ca_scale.scale, mlp_scale.scale, attn.{q,k}_norm.scale)
    text_model.rope.freqs                                       (dropped: mmtrain computes RoPE)
    vision_model.vision_encoder.conv1._linear.weight            encoder.clip.conv.weight (v, 3, p, p): Meta's patch
        (v, 3 * p * p)                                              embedding is a linear layer over unfolded patches
    vision_model.vision_encoder.class_embedding (v,)            encoder.clip.cls_token_embedding.weight
    vision_model.vision_encoder.positional_embedding (e, v)     encoder.clip.token_pos_embedding.local_token_positional_embedding
    vision_model.vision_encoder.gated_positional_embedding      encoder.clip.token_pos_embedding.global_token_positional_embedding
        (T, T, e, v) and its _gate                                  and .gate
    vision_model.vision_encoder.{pre,post}_tile_pos_embed.*     encoder.clip.{pre,post}_tile_pos_embed.*
    vision_model.vision_encoder.ln_{pre,post}.*                 encoder.clip.ln_{pre,post}.*
    vision_model.vision_encoder.transformer.resblocks.N.*       encoder.clip.layers.N.*
    vision_model.vision_encoder.global_transformer.resblocks.N.*   encoder.projection.layers.N.* (plus gate_attn,
        (attn.w{q,k,v,o} -> attn.{q,k,v,output}_proj, mlp.c_fc -> mlp.w1,   gate_ffn -> sa_scale.scale, mlp_scale.scale)
        mlp.c_proj -> mlp.w2, ln_1 -> sa_norm, ln_2 -> mlp_norm)
    vision_model.vision_projection.*                            encoder.projection.output.*

Meta runs cross-attention layer ``C`` before text layer ``M = (C + 1) * fusion_interval - 1`` (its fusion schedule),
which is where mmtrain's ``FusionLayer`` wraps it; ``fusion_interval`` is the number of text layers over the number of
cross-attention layers (4 for 11B: 32 and 8). Meta's q/k rows already rotate adjacent pairs, as mmtrain does, so no
tensor is permuted. Meta's model-parallel shards (``consolidated.00.pth``, ``consolidated.01.pth``, ... of the 90B
model) split tensors across files and are refused; the Hugging Face folder holds the same weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

__all__ = ["load_meta_checkpoint", "meta_to_mmtrain", "mmtrain_to_meta"]

_ROPE_FREQS = "text_model.rope.freqs"
_CONV = ("vision_model.vision_encoder.conv1._linear.weight", "encoder.clip.conv.weight")

_STATIC = {
    "text_model.tok_embeddings.weight": "decoder.tok_embeddings.weight",
    "text_model.learnable_embedding.weight": "decoder.tok_embeddings.fusion_embedding.weight",
    "text_model.norm.weight": "decoder.norm.scale",
    "text_model.output.weight": "decoder.output.weight",
    "vision_model.vision_encoder.class_embedding": "encoder.clip.cls_token_embedding.weight",
    "vision_model.vision_encoder.positional_embedding":
        "encoder.clip.token_pos_embedding.local_token_positional_embedding",
    "vision_model.vision_encoder.gated_positional_embedding":
        "encoder.clip.token_pos_embedding.global_token_positional_embedding",
    "vision_model.vision_encoder.gated_positional_embedding_gate": "encoder.clip.token_pos_embedding.gate",
    "vision_model.vision_encoder.pre_tile_pos_embed.embedding": "encoder.clip.pre_tile_pos_embed.embedding",
    "vision_model.vision_encoder.pre_tile_pos_embed.gate": "encoder.clip.pre_tile_pos_embed.gate",
    "vision_model.vision_encoder.post_tile_pos_embed.embedding": "encoder.clip.post_tile_pos_embed.embedding",
    "vision_model.vision_encoder.post_tile_pos_embed.gate": "encoder.clip.post_tile_pos_embed.gate",
    "vision_model.vision_projection.weight": "encoder.projection.output.weight",
    "vision_model.vision_projection.bias": "encoder.projection.output.bias",
    **{f"vision_model.vision_encoder.ln_{where}.{p}": f"encoder.clip.ln_{where}.{p}"
       for where in ("pre", "post") for p in ("weight", "bias")},
}
_TEXT_LAYER = {
    "attention_norm.weight": "sa_norm.scale",
    "ffn_norm.weight": "mlp_norm.scale",
    **{f"attention.w{m}.weight": f"attn.{o}.weight"
       for m, o in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "output_proj"))},
    **{f"feed_forward.w{i}.weight": f"mlp.w{i}.weight" for i in (1, 2, 3)},
}
_CROSS_LAYER = {
    **_TEXT_LAYER,
    "attention_norm.weight": "ca_norm.scale",
    "gate_attn": "ca_scale.scale",
    "gate_ffwd": "mlp_scale.scale",
    "attention.q_norm.weight": "attn.q_norm.scale",
    "attention.k_norm.weight": "attn.k_norm.scale",
}
_VISION_LAYER = {
    **{f"attn.w{m}.weight": f"attn.{o}.weight"
       for m, o in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "output_proj"))},
    **{f"mlp.{m}.{p}": f"mlp.{o}.{p}" for m, o in (("c_fc", "w1"), ("c_proj", "w2")) for p in ("weight", "bias")},
    **{f"ln_{i}.{p}": f"{o}.{p}" for i, o in ((1, "sa_norm"), (2, "mlp_norm")) for p in ("weight", "bias")},
}
_GLOBAL_LAYER = {**_VISION_LAYER, "gate_attn": "sa_scale.scale", "gate_ffn": "mlp_scale.scale"}

_META_TEXT = re.compile(r"^text_model\.(layers|cross_attention_layers)\.(\d+)\.(.+)$")
_META_VISION = re.compile(r"^vision_model\.vision_encoder\.(transformer|global_transformer)\.resblocks\.(\d+)\.(.+)$")
_OUR_TEXT = re.compile(r"^decoder\.layers\.(\d+)\.(fusion_layer\.)?(.+)$")
_OUR_VISION = re.compile(r"^encoder\.(clip|projection)\.layers\.(\d+)\.(.+)$")
_VISION_PREFIX = {"transformer": "encoder.clip", "global_transformer": "encoder.projection"}
_VISION_TABLE = {"transformer": _VISION_LAYER, "global_transformer": _GLOBAL_LAYER}


def _renamed(table: dict[str, str], suffix: str, key: str) -> str:
    if suffix not in table:
        raise ValueError(f"Meta checkpoint conversion: no counterpart for {key!r}")
    return table[suffix]


def _fusion_interval(num_layers: int, num_cross: int) -> int:
    if num_cross == 0:
        raise ValueError("Meta checkpoint conversion: no cross-attention layers: not a Llama 3.2 Vision model")
    if num_layers % num_cross:
        raise ValueError(f"Meta checkpoint conversion: {num_layers} text layers cannot hold {num_cross} "
                         "cross-attention layers at a regular interval")
    return num_layers // num_cross


def meta_to_mmtrain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's keys -> mmtrain's (torchtune's); ``text_model.rope.freqs`` is dropped, the patch embedding reshaped.
    An unknown key is a ValueError."""
    layers = {int(m.group(2)) for m in map(_META_TEXT.match, state_dict) if m and m.group(1) == "layers"}
    cross = {int(m.group(2)) for m in map(_META_TEXT.match, state_dict) if m and m.group(1) != "layers"}
    interval = _fusion_interval(len(layers), len(cross))
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == _ROPE_FREQS:
            continue
        if key == _CONV[0]:
            width, flat = value.shape
            patch = round((flat / 3) ** 0.5)
            if 3 * patch * patch != flat:
                raise ValueError(f"Meta checkpoint conversion: {key} has {flat} columns, not 3 x patch x patch")
            converted[_CONV[1]] = value.reshape(width, 3, patch, patch)
        elif key in _STATIC:
            converted[_STATIC[key]] = value
        elif match := _META_TEXT.match(key):
            kind, index, suffix = match.group(1), int(match.group(2)), match.group(3)
            if kind == "layers":
                converted[f"decoder.layers.{index}.{_renamed(_TEXT_LAYER, suffix, key)}"] = value
            else:
                layer = (index + 1) * interval - 1
                converted[f"decoder.layers.{layer}.fusion_layer.{_renamed(_CROSS_LAYER, suffix, key)}"] = value
        elif match := _META_VISION.match(key):
            stack, index, suffix = match.groups()
            converted[f"{_VISION_PREFIX[stack]}.layers.{index}.{_renamed(_VISION_TABLE[stack], suffix, key)}"] = value
        else:
            raise ValueError(f"Meta checkpoint conversion: no counterpart for {key!r}")
    return converted


def mmtrain_to_meta(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmtrain's (torchtune's) keys -> Meta's; the inverse of ``meta_to_mmtrain`` (``rope.freqs`` is not written)."""
    static = {v: k for k, v in _STATIC.items()}
    text, cross_table = ({v: k for k, v in t.items()} for t in (_TEXT_LAYER, _CROSS_LAYER))
    vision = {"clip": ("transformer", {v: k for k, v in _VISION_LAYER.items()}),
              "projection": ("global_transformer", {v: k for k, v in _GLOBAL_LAYER.items()})}
    layers = {int(m.group(1)) for m in map(_OUR_TEXT.match, state_dict) if m}
    fused = sorted({int(m.group(1)) for m in map(_OUR_TEXT.match, state_dict) if m and m.group(2)})
    interval = _fusion_interval(len(layers), len(fused))
    if fused != [(c + 1) * interval - 1 for c in range(len(fused))]:
        raise ValueError(f"Meta checkpoint conversion: cross-attention at layers {fused}, not every {interval}th")
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == _CONV[1]:
            converted[_CONV[0]] = value.reshape(value.shape[0], -1)
        elif key in static:
            converted[static[key]] = value
        elif match := _OUR_TEXT.match(key):
            index, suffix = int(match.group(1)), match.group(3)
            if match.group(2):
                cross = (index + 1) // interval - 1
                converted[f"text_model.cross_attention_layers.{cross}.{_renamed(cross_table, suffix, key)}"] = value
            else:
                converted[f"text_model.layers.{index}.{_renamed(text, suffix, key)}"] = value
        elif match := _OUR_VISION.match(key):
            stack, table = vision[match.group(1)]
            name = _renamed(table, match.group(3), key)
            converted[f"vision_model.vision_encoder.{stack}.resblocks.{match.group(2)}.{name}"] = value
        else:
            raise ValueError(f"Meta checkpoint conversion: no counterpart for {key!r}")
    return converted


def _checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    shards = sorted(path.glob("consolidated.*.pth"))
    if (path / "consolidated.pth").is_file():
        return path / "consolidated.pth"
    if len(shards) == 1:
        return shards[0]
    if shards:
        raise ValueError(f"{path} holds {len(shards)} model-parallel shards ({shards[0].name}, ...), which split "
                         "tensors across files; give the Hugging Face folder of the same model instead")
    raise FileNotFoundError(f"{path}: no consolidated.pth")


def load_meta_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read Meta's ``consolidated.pth`` (the file, or the folder holding it) -> the mmtrain state dict. Only
    tensors are unpickled (``weights_only=True``); the file is memory-mapped."""
    file = _checkpoint_file(Path(path).expanduser())
    state_dict = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{file}: expected a dict of tensors, found {type(state_dict).__name__}")
    return meta_to_mmtrain(state_dict)
