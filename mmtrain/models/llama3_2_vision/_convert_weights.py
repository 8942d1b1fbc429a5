"""Llama 3.2 Vision weights: Hugging Face ``MllamaForConditionalGeneration`` <-> mmtrain (torchtune's keys).

``hf_to_mmtrain`` / ``mmtrain_to_hf`` take the arguments of torchtune's ``llama3_vision_hf_to_tune`` /
``llama3_vision_tune_to_hf``; ``load_hf_checkpoint(folder)`` reads a local HF folder (``config.json`` with
``model_type`` "mllama", ``model.safetensors`` or ``model.safetensors.index.json`` + shards; never a pickle) and
returns the mmtrain state dict with the builder arguments it needs.

Key layouts. HF has two spellings of the same tensors: the files (``save_pretrained``, the Hub, torchtune's output)
and the module tree of transformers >= 4.52 (``model.state_dict()``). Both are read; ``mmtrain_to_hf`` writes the
file spelling unless ``layout="transformers"``::

    file                              module tree (transformers >= 4.52)   mmtrain
    vision_model.*                    model.vision_model.*                 encoder.clip.* / encoder.projection.layers.*
    multi_modal_projector.*           model.multi_modal_projector.*        encoder.projection.output.*
    language_model.model.*            model.language_model.*               decoder.*
    language_model.lm_head.weight     lm_head.weight                       decoder.output.weight

Below, ``d`` is the text width, ``v`` the vision width, ``n`` heads, ``hd`` the head width, ``T`` max_num_tiles,
``R`` the number of supported aspect ratios, ``e = (tile_size // patch) ** 2 + 1`` tokens per tile (CLS first).

Text (file names without ``language_model.model.``). HF numbers self- and cross-attention layers in one list;
mmtrain wraps each cross-attention layer with the self-attention layer after it in a ``FusionLayer``, so HF layer
``L`` becomes mmtrain layer ``L - (cross-attention layers before L)``:

    embed_tokens.weight (vocab + 8, d)             tok_embeddings.weight (vocab, d) and
                                                   tok_embeddings.fusion_embedding.weight (8, d): split at vocab
    layers.L.self_attn.{q,k}_proj.weight           layers.M.attn.{q,k}_proj.weight (n * hd, d): rows permuted
    layers.L.self_attn.{v,o}_proj.weight           layers.M.attn.{v,output}_proj.weight
    layers.L.mlp.{gate,down,up}_proj.weight        layers.M.mlp.{w1,w2,w3}.weight
    layers.L.{input,post_attention}_layernorm      layers.M.{sa,mlp}_norm.scale
    layers.C.cross_attn.{q,k,v,o}_proj.weight      layers.M.fusion_layer.attn.{q,k,v,output}_proj.weight (no RoPE,
                                                   so no permutation)
    layers.C.cross_attn.{q,k}_norm.weight (hd,)    layers.M.fusion_layer.attn.{q,k}_norm.scale
    layers.C.cross_attn_{attn,mlp}_gate (1,)       layers.M.fusion_layer.{ca,mlp}_scale.scale
    layers.C.{input,post_attention}_layernorm      layers.M.fusion_layer.{ca,mlp}_norm.scale
    layers.C.mlp.*                                 layers.M.fusion_layer.mlp.*
    norm.weight, ../lm_head.weight (vocab, d)      norm.scale, output.weight

The q/k permutation: HF rotates the two halves of each head (``rotate_half``), torchtune and Meta rotate adjacent
pairs, so row ``j`` of a head in the HF layout is row ``2j`` (first half) or ``2(j - hd/2) + 1`` (second half) in
ours: ``w.view(n, 2, hd // 2, d).transpose(1, 2)``.

Vision (file names without ``vision_model.``):

    patch_embedding.weight (v, 3, p, p)                          clip.conv.weight
    class_embedding (v,)                                         clip.cls_token_embedding.weight
    gated_positional_embedding.embedding (e, v)                  clip.token_pos_embedding.local_token_positional_embedding
    gated_positional_embedding.tile_embedding.weight             clip.token_pos_embedding.global_token_positional_embedding
        (R + 1, T * e * v)                                           (T, T, e, v)
    {pre,post}_tile_positional_embedding.embedding.weight        clip.{pre,post}_tile_pos_embed.embedding (T, T, 1, v)
        (R + 1, T * v)
    *.gate (1,)                                                  the same module's gate
    layernorm_{pre,post}.*                                       clip.ln_{pre,post}.*
    transformer.layers.N.*                                       clip.layers.N.*
    global_transformer.layers.N.* (+ gate_attn, gate_ffn)        projection.layers.N.* (+ sa_scale, mlp_scale)
    (both: self_attn.{q,k,v,o}_proj -> attn.{q,k,v,output}_proj, mlp.fc{1,2} -> mlp.w{1,2},
     input_layernorm -> sa_norm, post_attention_layernorm -> mlp_norm)
    ../multi_modal_projector.* (d, v * (1 + hidden states))      projection.output.*

HF stores the tile embeddings pre-looked-up per aspect ratio: row ``i + 1`` holds, for ratio ``(h, w) =
supported_aspect_ratios[i]``, the embeddings of its ``h * w`` tiles in row-major order and zeros for the padding
tiles; row 0 (no image) is zero. mmtrain (and Meta) keep the ``(T, T)`` grid and look the cell up at run time. The
grid is read back from every ratio's row, so the conversion is exact for checkpoints made from a grid (Meta's
conversion, torchtune's, this one); a table whose rows disagree (e.g. one fine-tuned in HF, where each ratio's row
trains on its own) cannot be represented and is converted with a warning naming the key. Grid cells no supported
ratio reaches (with 4 tiles, e.g. (1, 2)) are not stored by HF, never read by mmtrain, and come back as zeros.

What the converted weights compute: Meta's reference model (the code they were trained with), as torchtune 0.6.1,
except that the vision encoder does not pad each tile to a multiple of 8 tokens; Meta and transformers do, and let
real tokens attend to that padding. transformers also departs from Meta where mmtrain does not: a text token before
the first image gets cross-attention output (Meta zeroes it), and in transformers 5.x
``intermediate_layers_indices`` picks the output of layer i instead of its input. The tests
(tests/models/llama3_2_vision/test_convert_weights.py) compare with transformers with these three points aligned.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmtrain.errors import CheckpointError

__all__ = [
    "HFCheckpointError",
    "HFCheckpointNotFoundError",
    "hf_to_mmtrain",
    "load_hf_checkpoint",
    "mmtrain_to_hf",
]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class HFCheckpointError(CheckpointError, ValueError):
    """An HF Llama 3.2 Vision checkpoint (config, key or shape) that mmtrain's model cannot take."""


class HFCheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint folder or one of its files is missing."""


# ---- key tables (file spelling on the HF side) ----------------------------------------------------------------------

_STATIC = {
    "vision_model.class_embedding": "encoder.clip.cls_token_embedding.weight",
    "vision_model.patch_embedding.weight": "encoder.clip.conv.weight",
    "vision_model.gated_positional_embedding.embedding":
        "encoder.clip.token_pos_embedding.local_token_positional_embedding",
    "vision_model.gated_positional_embedding.tile_embedding.weight":
        "encoder.clip.token_pos_embedding.global_token_positional_embedding",
    "vision_model.gated_positional_embedding.gate": "encoder.clip.token_pos_embedding.gate",
    "vision_model.pre_tile_positional_embedding.embedding.weight": "encoder.clip.pre_tile_pos_embed.embedding",
    "vision_model.pre_tile_positional_embedding.gate": "encoder.clip.pre_tile_pos_embed.gate",
    "vision_model.post_tile_positional_embedding.embedding.weight": "encoder.clip.post_tile_pos_embed.embedding",
    "vision_model.post_tile_positional_embedding.gate": "encoder.clip.post_tile_pos_embed.gate",
    "vision_model.layernorm_pre.weight": "encoder.clip.ln_pre.weight",
    "vision_model.layernorm_pre.bias": "encoder.clip.ln_pre.bias",
    "vision_model.layernorm_post.weight": "encoder.clip.ln_post.weight",
    "vision_model.layernorm_post.bias": "encoder.clip.ln_post.bias",
    "multi_modal_projector.weight": "encoder.projection.output.weight",
    "multi_modal_projector.bias": "encoder.projection.output.bias",
    "language_model.model.embed_tokens.weight": "decoder.tok_embeddings.weight",
    "language_model.model.norm.weight": "decoder.norm.scale",
    "language_model.lm_head.weight": "decoder.output.weight",
}
_VISION_LAYER = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "mlp.fc1.weight": "mlp.w1.weight",
    "mlp.fc1.bias": "mlp.w1.bias",
    "mlp.fc2.weight": "mlp.w2.weight",
    "mlp.fc2.bias": "mlp.w2.bias",
    "input_layernorm.weight": "sa_norm.weight",
    "input_layernorm.bias": "sa_norm.bias",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "post_attention_layernorm.bias": "mlp_norm.bias",
}
_GLOBAL_LAYER = {**_VISION_LAYER, "gate_attn": "sa_scale.scale", "gate_ffn": "mlp_scale.scale"}
_MLP = {"mlp.gate_proj.weight": "mlp.w1.weight", "mlp.down_proj.weight": "mlp.w2.weight",
        "mlp.up_proj.weight": "mlp.w3.weight"}
_SELF_LAYER = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "input_layernorm.weight": "sa_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    **_MLP,
}
# Same HF names as a self-attention layer for the norms and MLP: the layer's kind decides where they go.
_CROSS_LAYER = {
    "cross_attn.q_proj.weight": "attn.q_proj.weight",
    "cross_attn.k_proj.weight": "attn.k_proj.weight",
    "cross_attn.v_proj.weight": "attn.v_proj.weight",
    "cross_attn.o_proj.weight": "attn.output_proj.weight",
    "cross_attn.q_norm.weight": "attn.q_norm.scale",
    "cross_attn.k_norm.weight": "attn.k_norm.scale",
    "cross_attn_attn_gate": "ca_scale.scale",
    "cross_attn_mlp_gate": "mlp_scale.scale",
    "input_layernorm.weight": "ca_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    **_MLP,
}
_STATIC_INV = {v: k for k, v in _STATIC.items()}
_VISION_LAYER_INV = {v: k for k, v in _VISION_LAYER.items()}
_GLOBAL_LAYER_INV = {v: k for k, v in _GLOBAL_LAYER.items()}
_SELF_LAYER_INV = {v: k for k, v in _SELF_LAYER.items()}
_CROSS_LAYER_INV = {v: k for k, v in _CROSS_LAYER.items()}

_FUSION_EMBED = "decoder.tok_embeddings.fusion_embedding.weight"
_TOK_EMBED = "decoder.tok_embeddings.weight"
_TILE_TABLES = {  # mmtrain key -> whether the table has a token axis (e > 1)
    "encoder.clip.token_pos_embedding.global_token_positional_embedding": True,
    "encoder.clip.pre_tile_pos_embed.embedding": False,
    "encoder.clip.post_tile_pos_embed.embedding": False,
}

_VISION_LAYER_RE = re.compile(r"^vision_model\.(transformer|global_transformer)\.layers\.(\d+)\.(.+)$")
_TEXT_LAYER_RE = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
_OUR_VISION_LAYER_RE = re.compile(r"^encoder\.(clip|projection)\.layers\.(\d+)\.(.+)$")
_OUR_TEXT_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Module-tree prefix -> file prefix (transformers >= 4.52 moved the towers under ``model.``).
_MODULE_TO_FILE = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
_LAYOUTS = ("checkpoint", "transformers")


def _file_key(key: str) -> str:
    for module_prefix, file_prefix in _MODULE_TO_FILE:
        if key.startswith(module_prefix):
            return file_prefix + key[len(module_prefix):]
    return key


def _module_key(key: str) -> str:
    for module_prefix, file_prefix in _MODULE_TO_FILE:
        if key.startswith(file_prefix):
            return module_prefix + key[len(file_prefix):]
    return key


def default_aspect_ratios(num_tiles: int) -> list[tuple[int, int]]:
    """HF's default ``supported_aspect_ratios``: every (h, w) grid of at most ``num_tiles`` tiles, in
    lexicographic order (for 4 tiles the list in ``MllamaVisionConfig``)."""
    return [(h, w) for h in range(1, num_tiles + 1) for w in range(1, num_tiles + 1) if h * w <= num_tiles]


def _ratios(supported_aspect_ratios: Sequence[Sequence[int]] | None, num_tiles: int) -> list[tuple[int, int]]:
    if supported_aspect_ratios is None:
        return default_aspect_ratios(num_tiles)
    ratios = [(int(r[0]), int(r[1])) for r in supported_aspect_ratios]
    for h, w in ratios:
        if h < 1 or w < 1 or h * w > num_tiles:
            raise HFCheckpointError(f"supported_aspect_ratios: ({h}, {w}) is not a grid of 1 to num_tiles={num_tiles} "
                                    "tiles")
    return ratios


def _rope_permute(key: str, w: torch.Tensor, rows_heads: int, head_dim: int, to_hf: bool) -> torch.Tensor:
    if w.ndim != 2 or w.shape[0] != rows_heads * head_dim or head_dim % 2:
        raise HFCheckpointError(f"{key}: shape {tuple(w.shape)} does not fit {rows_heads} heads of width {head_dim} "
                                "(an even head width is needed for RoPE)")
    if to_hf:  # interleaved pairs -> halves
        return w.view(rows_heads, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
    return w.view(rows_heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _table_to_grid(key: str, table: torch.Tensor, ratios: list[tuple[int, int]], num_tiles: int,
                   encoder_dim: int) -> torch.Tensor:
    """(R + 1, T * e * v) per-ratio table -> (T, T, e, v) grid."""
    if table.ndim != 2 or table.shape[0] != len(ratios) + 1 or table.shape[1] % (num_tiles * encoder_dim):
        raise HFCheckpointError(
            f"{key}: shape {tuple(table.shape)} does not fit {len(ratios)} supported aspect ratios + 1 rows of "
            f"num_tiles={num_tiles} x (tokens x encoder_dim={encoder_dim}) values")
    tokens = table.shape[1] // (num_tiles * encoder_dim)
    rows = table.reshape(len(ratios) + 1, num_tiles, tokens, encoder_dim)
    grid = table.new_zeros(num_tiles, num_tiles, tokens, encoder_dim)
    # Fewest tiles first, so where rows disagree the full-grid ratios (the ones torchtune reads) win.
    for i in sorted(range(len(ratios)), key=lambda i: ratios[i][0] * ratios[i][1]):
        h, w = ratios[i]
        grid[:h, :w] = rows[i + 1, : h * w].reshape(h, w, tokens, encoder_dim)
    if table.device.type != "meta" and not torch.equal(_grid_to_table(grid, ratios), table):
        warnings.warn(f"{key}: the per-aspect-ratio rows disagree on shared tiles (or padding is not zero); the "
                      "(max_num_tiles, max_num_tiles) grid keeps one value per tile, so this table is not exactly "
                      "representable", stacklevel=3)
    return grid


def _grid_to_table(grid: torch.Tensor, ratios: list[tuple[int, int]]) -> torch.Tensor:
    """(T, T, e, v) grid -> (R + 1, T * e * v) per-ratio table, zeros for padding tiles and row 0."""
    num_tiles, _, tokens, dim = grid.shape
    table = grid.new_zeros(len(ratios) + 1, num_tiles, tokens, dim)
    for i, (h, w) in enumerate(ratios):
        table[i + 1, : h * w] = grid[:h, :w].reshape(h * w, tokens, dim)
    return table.flatten(1)


def _text_layer_index(layer: int, cross: list[int]) -> int:
    return layer - bisect_left(cross, layer)


def _cross_layers_from_hf(keys: list[str]) -> list[int]:
    found = set()
    for key in keys:
        match = _TEXT_LAYER_RE.match(key)
        if match and match.group(2).startswith("cross_attn"):
            found.add(int(match.group(1)))
    return sorted(found)


def _check_cross_layers(given: Sequence[int] | None, found: list[int], what: str) -> list[int]:
    if given is not None and sorted(int(c) for c in given) != found:
        raise HFCheckpointError(f"cross_attention_layers={list(given)} but the state dict has cross-attention "
                                f"weights in {what} {found}")
    return found


def hf_to_mmtrain(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    dim: int = 4096,
    head_dim: int | None = None,
    vocab_size: int = 128_256,
    cross_attention_layers: Sequence[int] | None = None,
    encoder_dim: int = 1280,
    tile_size: int = 560,
    num_tiles: int = 4,
    supported_aspect_ratios: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """HF ``MllamaForConditionalGeneration`` state dict (file or module-tree keys) -> mmtrain ``DeepFusionModel``
    state dict, as torchtune's ``llama3_vision_hf_to_tune``.

    Args:
        state_dict: HF tensors; ``rotary_emb.inv_freq`` buffers (old files) are dropped.
        num_heads, num_kv_heads, dim, head_dim: text attention shape (``head_dim`` defaults to ``dim // num_heads``).
        vocab_size: text vocabulary; embedding rows past it become the fusion embedding (HF adds 8).
        cross_attention_layers: HF indices of the cross-attention layers; None reads them from the keys (torchtune
            reads None as "no cross-attention layers"); given, they must match the keys.
        encoder_dim: vision width.
        tile_size: tile side in pixels; checked against the local positional embedding (448 vs 560 mix-ups).
        num_tiles: ``max_num_tiles`` of the vision config.
        supported_aspect_ratios: the vision config's list of (h, w); None means HF's default for ``num_tiles``.

    Raises:
        HFCheckpointError (a ValueError): a key that maps to no mmtrain parameter, two keys that map to one, a
            cross-attention layout a ``FusionLayer`` stack cannot hold, or a tensor whose shape does not fit.
    """
    head_dim = head_dim or dim // num_heads
    ratios = _ratios(supported_aspect_ratios, num_tiles)
    file_state: dict[str, tuple[str, torch.Tensor]] = {}  # file key -> (key as given, for messages; tensor)
    for key, value in state_dict.items():
        file_key = _file_key(key)
        if file_key in file_state:
            raise HFCheckpointError(f"{key}: the state dict holds this tensor twice (module-tree and file keys)")
        file_state[file_key] = (key, value)
    keys = list(file_state)
    text_layers = {int(m.group(1)) for m in map(_TEXT_LAYER_RE.match, keys) if m}
    if text_layers:
        cross = _check_cross_layers(cross_attention_layers, _cross_layers_from_hf(keys), "HF layers")
        num_self = len(text_layers - set(cross))
        for c in cross:
            if c + 1 in cross or _text_layer_index(c, cross) >= num_self:
                raise HFCheckpointError(
                    f"cross-attention layer {c} is not followed by a self-attention layer: mmtrain fuses each "
                    f"cross-attention layer into the decoder layer after it (cross_attention_layers={cross})")
    else:  # a vision-only part of a state dict
        cross = sorted(int(c) for c in cross_attention_layers or [])

    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}

    def put(new_key: str, value: torch.Tensor, source: str) -> None:
        if new_key in out:
            raise HFCheckpointError(f"{source}: maps to {new_key}, which {sources[new_key]} already gave")
        out[new_key] = value
        sources[new_key] = source

    for file_key, (key, value) in file_state.items():
        if file_key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config, never a parameter
        if file_key in _STATIC:
            new_key = _STATIC[file_key]
            if new_key == _TOK_EMBED:
                if value.ndim != 2 or value.shape[0] <= vocab_size or value.shape[1] != dim:
                    raise HFCheckpointError(f"{key}: shape {tuple(value.shape)} does not fit vocab_size={vocab_size} "
                                            f"plus special tokens rows of dim={dim}")
                put(_FUSION_EMBED, value[vocab_size:].clone(), key)
                value = value[:vocab_size]
            elif new_key in _TILE_TABLES:
                value = _table_to_grid(key, value, ratios, num_tiles, encoder_dim)
            put(new_key, value, key)
            continue
        match = _VISION_LAYER_RE.match(file_key)
        if match:
            tower, layer, rest = match.groups()
            table, prefix = (_VISION_LAYER, "encoder.clip") if tower == "transformer" else (_GLOBAL_LAYER,
                                                                                           "encoder.projection")
            if rest not in table:
                raise HFCheckpointError(f"{key}: no mmtrain parameter maps to this key")
            put(f"{prefix}.layers.{layer}.{table[rest]}", value, key)
            continue
        match = _TEXT_LAYER_RE.match(file_key)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
            is_cross = layer in cross
            table = _CROSS_LAYER if is_cross else _SELF_LAYER
            if rest not in table:
                raise HFCheckpointError(f"{key}: no mmtrain parameter maps to this key")
            if not is_cross and rest == "self_attn.q_proj.weight":
                value = _rope_permute(key, value, num_heads, head_dim, to_hf=False)
            elif not is_cross and rest == "self_attn.k_proj.weight":
                value = _rope_permute(key, value, num_kv_heads, head_dim, to_hf=False)
            fusion = "fusion_layer." if is_cross else ""
            put(f"decoder.layers.{_text_layer_index(layer, cross)}.{fusion}{table[rest]}", value, key)
            continue
        raise HFCheckpointError(f"{key}: no mmtrain parameter maps to this key")

    conv, local = out.get("encoder.clip.conv.weight"), out.get(_STATIC["vision_model.gated_positional_embedding.embedding"])
    if conv is not None and local is not None and conv.ndim == 4:
        tokens = (tile_size // conv.shape[-1]) ** 2 + 1
        if local.shape[0] != tokens:
            raise HFCheckpointError(
                f"vision_model.gated_positional_embedding.embedding: {local.shape[0]} tokens per tile, but "
                f"tile_size={tile_size} with patch {conv.shape[-1]} gives {tokens}")
    return out


def mmtrain_to_hf(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    dim: int = 4096,
    head_dim: int | None = None,
    vocab_size: int = 128_256,
    cross_attention_layers: Sequence[int] | None = None,
    encoder_dim: int = 1280,
    tile_size: int = 560,
    num_tiles: int = 4,
    supported_aspect_ratios: Sequence[Sequence[int]] | None = None,
    layout: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """mmtrain ``DeepFusionModel`` state dict -> HF ``MllamaForConditionalGeneration`` state dict, the inverse of
    ``hf_to_mmtrain`` (torchtune's ``llama3_vision_tune_to_hf``).

    ``layout="checkpoint"`` gives the file keys (what ``save_pretrained`` writes and ``from_pretrained`` reads),
    ``"transformers"`` the module-tree keys of transformers >= 4.52. ``cross_attention_layers`` (HF indices) is
    read from the ``fusion_layer`` keys; given, it must match them. ``vocab_size`` and ``tile_size`` are accepted
    for symmetry with ``hf_to_mmtrain``: the shapes carry them. LoRA adapters must be merged first: their keys map
    to nothing in HF.

    Raises:
        HFCheckpointError (a ValueError): an unknown key, a fusion embedding without the token embedding (or the
            reverse), a layout other than the two above, or a tensor whose shape does not fit.
    """
    del vocab_size, tile_size
    if layout not in _LAYOUTS:
        raise HFCheckpointError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    head_dim = head_dim or dim // num_heads
    ratios = _ratios(supported_aspect_ratios, num_tiles)
    fusion_layers = sorted({int(m.group(1)) for m in map(_OUR_TEXT_LAYER_RE.match, state_dict)
                            if m and m.group(2).startswith("fusion_layer.")})
    if any(map(_OUR_TEXT_LAYER_RE.match, state_dict)):
        hf_cross = [m + k for k, m in enumerate(fusion_layers)]
        _check_cross_layers(cross_attention_layers, hf_cross, "HF layers (from the fusion_layer keys)")
    if (_TOK_EMBED in state_dict) != (_FUSION_EMBED in state_dict):
        missing = _FUSION_EMBED if _TOK_EMBED in state_dict else _TOK_EMBED
        raise HFCheckpointError(f"{missing}: missing; HF keeps the token and fusion embeddings in one table")

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == _FUSION_EMBED:
            continue
        if key in _STATIC_INV:
            new_key = _STATIC_INV[key]
            if key == _TOK_EMBED:
                fusion = state_dict[_FUSION_EMBED]
                if value.ndim != 2 or fusion.ndim != 2 or value.shape[1] != fusion.shape[1]:
                    raise HFCheckpointError(f"{key}: shape {tuple(value.shape)} and {_FUSION_EMBED} shape "
                                            f"{tuple(fusion.shape)} do not stack into one table")
                value = torch.cat([value, fusion])
            elif key in _TILE_TABLES:
                if value.ndim != 4 or value.shape[:2] != (num_tiles, num_tiles) or value.shape[3] != encoder_dim:
                    raise HFCheckpointError(f"{key}: shape {tuple(value.shape)} does not fit (num_tiles={num_tiles}, "
                                            f"num_tiles, tokens, encoder_dim={encoder_dim})")
                value = _grid_to_table(value, ratios)
            out[new_key] = value
            continue
        match = _OUR_VISION_LAYER_RE.match(key)
        if match:
            tower, layer, rest = match.groups()
            table, prefix = ((_VISION_LAYER_INV, "transformer") if tower == "clip"
                             else (_GLOBAL_LAYER_INV, "global_transformer"))
            if rest not in table:
                raise HFCheckpointError(f"{key}: no HF parameter maps to this key")
            out[f"vision_model.{prefix}.layers.{layer}.{table[rest]}"] = value
            continue
        match = _OUR_TEXT_LAYER_RE.match(key)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
            fused_before = bisect_left(fusion_layers, layer)  # fusion layers at smaller mmtrain indices
            if rest.startswith("fusion_layer."):
                rest, table, hf_layer = rest[len("fusion_layer."):], _CROSS_LAYER_INV, layer + fused_before
            else:
                table = _SELF_LAYER_INV
                hf_layer = layer + fused_before + (1 if layer in fusion_layers else 0)
            if rest not in table:
                raise HFCheckpointError(f"{key}: no HF parameter maps to this key")
            if table is _SELF_LAYER_INV and rest == "attn.q_proj.weight":
                value = _rope_permute(key, value, num_heads, head_dim, to_hf=True)
            elif table is _SELF_LAYER_INV and rest == "attn.k_proj.weight":
                value = _rope_permute(key, value, num_kv_heads, head_dim, to_hf=True)
            out[f"language_model.model.layers.{hf_layer}.{table[rest]}"] = value
            continue
        raise HFCheckpointError(f"{key}: no HF parameter maps to this key")
    if layout == "transformers":
        out = {_module_key(k): v for k, v in out.items()}
    return out


# ---- reading a local HF folder --------------------------------------------------------------------------------------

# MllamaTextConfig / MllamaVisionConfig defaults, for config.json files that leave a field out.
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128_256, "hidden_size": 4096, "hidden_act": "silu", "num_hidden_layers": 40,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14_336, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131_072, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    "tie_word_embeddings": False,
}
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1280, "hidden_act": "gelu", "num_hidden_layers": 32, "num_global_layers": 8, "attention_heads": 16,
    "num_channels": 3, "intermediate_size": 5120, "vision_output_dim": 7680, "image_size": 448, "patch_size": 14,
    "norm_eps": 1e-5, "max_num_tiles": 4, "intermediate_layers_indices": [3, 7, 15, 23, 30],
    "supported_aspect_ratios": None,
}
# What mmtrain's decoder builder fixes (Llama3ScaledRoPE's defaults): other RoPE scalings cannot be built.
_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# Cross-attention KV cache length the 11B preset sizes for: 20 images of max_num_tiles tiles.
_CACHE_IMAGES = 20


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HFCheckpointError(f"{path}: cannot read JSON ({message})") from None


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise HFCheckpointError(f"{CONFIG_NAME}: vision_config.{name}={value} is not square")
        value = value[0]
    return int(value)


def _rope(text: Mapping[str, Any]) -> float:
    """rope_theta from either config spelling (transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters)."""
    params = dict(text.get("rope_parameters") or {})
    scaling = dict(text.get("rope_scaling") or params)
    theta = params.get("rope_theta", text.get("rope_theta", 500_000.0))
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3" or any(not math.isclose(float(scaling.get(k, math.nan)), v)
                                    for k, v in _LLAMA3_ROPE.items()):
        shown = {k: scaling.get(k) for k in ("rope_type", *_LLAMA3_ROPE)}
        raise HFCheckpointError(f"{CONFIG_NAME}: text_config RoPE scaling {shown} is not the Llama 3.1 scaling "
                                f"mmtrain's decoder builds (llama3 with {_LLAMA3_ROPE})")
    return float(theta)


def _builder_kwargs(config: Mapping[str, Any], num_special_tokens: int) -> dict[str, dict[str, Any]]:
    text = {**_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    vision = {**_VISION_DEFAULTS, **(config.get("vision_config") or {})}

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise HFCheckpointError(f"{CONFIG_NAME}: {what}, which mmtrain's Llama 3.2 Vision builders do not build")

    need(text["hidden_act"] == "silu", f"text_config.hidden_act={text['hidden_act']!r} (SwiGLU needs 'silu')")
    need(vision["hidden_act"] == "gelu", f"vision_config.hidden_act={vision['hidden_act']!r} (needs 'gelu')")
    need(math.isclose(text["rms_norm_eps"], 1e-5), f"text_config.rms_norm_eps={text['rms_norm_eps']} (fixed 1e-5)")
    need(math.isclose(vision["norm_eps"], 1e-5), f"vision_config.norm_eps={vision['norm_eps']} (fixed 1e-5)")
    need(not text["tie_word_embeddings"], "text_config.tie_word_embeddings=true (the output projection is untied)")
    width, heads = int(vision["hidden_size"]), int(vision["attention_heads"])
    need(int(vision["intermediate_size"]) == 4 * width,
         f"vision_config.intermediate_size={vision['intermediate_size']} (fixed at 4 x hidden_size={4 * width})")
    indices = [int(i) for i in vision["intermediate_layers_indices"]]
    need(int(vision["vision_output_dim"]) == width * (len(indices) + 1),
         f"vision_config.vision_output_dim={vision['vision_output_dim']} (hidden_size x (1 + "
         f"len(intermediate_layers_indices)) = {width * (len(indices) + 1)})")
    need(int(vision["max_num_tiles"]) >= 2, f"vision_config.max_num_tiles={vision['max_num_tiles']} (the encoder "
         "keeps tile embeddings only for 2 or more tiles)")
    need(all(0 <= i < int(vision["num_hidden_layers"]) for i in indices),
         f"vision_config.intermediate_layers_indices={indices} (each must be below num_hidden_layers)")

    cross = sorted(int(c) for c in text["cross_attention_layers"])
    num_layers = int(text["num_hidden_layers"]) - len(cross)
    interval = num_layers // len(cross) if cross and num_layers % len(cross) == 0 else 0
    need(interval > 0 and cross == [k * (interval + 1) + interval - 1 for k in range(len(cross))],
         f"text_config.cross_attention_layers={cross} with num_hidden_layers={text['num_hidden_layers']} (needs one "
         "cross-attention layer before every k-th decoder layer)")
    tile_size, patch_size = _square(vision["image_size"], "image_size"), _square(vision["patch_size"], "patch_size")
    max_num_tiles = int(vision["max_num_tiles"])
    encoder = {
        "patch_size": patch_size,
        "num_heads": heads,
        "clip_embed_dim": width,
        "clip_num_layers": int(vision["num_hidden_layers"]),
        "clip_hidden_states": indices,
        "num_layers_projection": int(vision["num_global_layers"]),
        "decoder_embed_dim": int(text["hidden_size"]),
        "tile_size": tile_size,
        "max_num_tiles": max_num_tiles,
        "in_channels": int(vision["num_channels"]),
    }
    decoder = {
        "vocab_size": int(text["vocab_size"]),
        "num_layers": num_layers,
        "fusion_interval": interval,
        "num_special_tokens": num_special_tokens,
        "num_heads": int(text["num_attention_heads"]),
        "num_kv_heads": int(text["num_key_value_heads"]),
        "embed_dim": int(text["hidden_size"]),
        "max_seq_len": int(text["max_position_embeddings"]),
        "encoder_max_seq_len": _CACHE_IMAGES * max_num_tiles * ((tile_size // patch_size) ** 2 + 1),
        "rope_base": _rope(text),
        "intermediate_dim": int(text["intermediate_size"]),
    }
    return {"encoder": encoder, "decoder": decoder}


def _read_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    single, index = os.path.join(folder, SAFE_WEIGHTS_NAME), os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index}: no weight_map")
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
    elif os.path.isfile(single):
        shards = {SAFE_WEIGHTS_NAME: []}
    else:
        raise HFCheckpointNotFoundError(f"{folder}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (pickled "
                                        "pytorch_model.bin files are not read)")
    state: dict[str, torch.Tensor] = {}
    for shard, listed in shards.items():
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise HFCheckpointNotFoundError(f"{path}: missing (listed in {SAFE_WEIGHTS_INDEX_NAME})")
        try:
            with safe_open(path, framework="pt") as handle:
                names = list(handle.keys())
                for key in listed:
                    if key not in names:
                        raise HFCheckpointError(f"{key}: listed in {index} under {shard}, but not in that file")
                for key in names:
                    if key in state:
                        raise HFCheckpointError(f"{key}: in more than one shard ({path} and another)")
                    state[key] = handle.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as err:  # truncated or corrupt file
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise HFCheckpointError(f"{path}: cannot read safetensors ({message})") from None
    return state


def _check_against_model(state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Mapping[str, Any]]) -> None:
    """Every parameter of the model the config describes, with its shape, and nothing else (built on meta)."""
    from mmtrain.models.llama3_2_vision._component_builders import llama3_2_vision_encoder
    from mmtrain.models.llama3_2_vision._decoder import llama3_2_vision_decoder
    from mmtrain.modules.fusion import DeepFusionModel

    with torch.device("meta"):
        model = DeepFusionModel(encoder=llama3_2_vision_encoder(**kwargs["encoder"]),
                                decoder=llama3_2_vision_decoder(**kwargs["decoder"]))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in expected:
        if key not in state:
            raise HFCheckpointError(f"{key}: missing from the converted checkpoint (its HF tensor is absent)")
    for key, value in state.items():
        if key not in expected:
            raise HFCheckpointError(f"{key}: not a parameter of the model config.json describes")
        if tuple(value.shape) != expected[key]:
            raise HFCheckpointError(f"{key}: shape {tuple(value.shape)} from the checkpoint, {expected[key]} from "
                                    f"{CONFIG_NAME}")


def load_hf_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Read a local HF Llama 3.2 Vision folder -> (mmtrain state dict, builder kwargs).

    The builder kwargs are ``{"encoder": kwargs of llama3_2_vision_encoder, "decoder": kwargs of
    llama3_2_vision_decoder}``; ``DeepFusionModel(encoder=llama3_2_vision_encoder(**kw["encoder"]),
    decoder=llama3_2_vision_decoder(**kw["decoder"]))`` then loads the state dict with ``strict=True`` (for the
    published 11B weights that is ``llama3_2_vision_11b(image_size=kw["encoder"]["tile_size"])``).
    ``encoder_max_seq_len`` (a KV-cache size, not in config.json) is set as the 11B preset's: 20 images.
    Tensors keep the file's dtype.

    Raises:
        HFCheckpointNotFoundError (a FileNotFoundError): no folder, no config.json, no safetensors file or a shard
            the index lists.
        HFCheckpointError (a ValueError): ``model_type`` is not "mllama", a config mmtrain's builders cannot build,
            a key that maps nowhere, or shapes that do not fit the model the config describes.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise HFCheckpointNotFoundError(f"{folder}: no such folder")
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise HFCheckpointNotFoundError(f"{config_path}: missing (an HF checkpoint folder has config.json)")
    config = _read_json(config_path)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "mllama":
        raise HFCheckpointError(f"{config_path}: model_type is {model_type!r}, expected 'mllama' "
                                "(MllamaForConditionalGeneration, Llama 3.2 Vision)")
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    kwargs = _builder_kwargs(config, num_special_tokens=8)
    state = _read_weights(folder)
    converted = hf_to_mmtrain(
        state,
        num_heads=kwargs["decoder"]["num_heads"],
        num_kv_heads=kwargs["decoder"]["num_kv_heads"],
        dim=kwargs["decoder"]["embed_dim"],
        head_dim=text.get("head_dim"),
        vocab_size=kwargs["decoder"]["vocab_size"],
        cross_attention_layers=text.get("cross_attention_layers", _TEXT_DEFAULTS["cross_attention_layers"]),
        encoder_dim=kwargs["encoder"]["clip_embed_dim"],
        tile_size=kwargs["encoder"]["tile_size"],
        num_tiles=kwargs["encoder"]["max_num_tiles"],
        supported_aspect_ratios=vision.get("supported_aspect_ratios"),
    )
    fusion = converted.get(_FUSION_EMBED)
    if fusion is not None:
        kwargs["decoder"]["num_special_tokens"] = int(fusion.shape[0])
    _check_against_model(converted, kwargs)
    return converted, kwargs
