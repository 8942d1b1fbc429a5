"""Llama 3.2 Vision model builders: the published 11B shapes and a tiny CPU-trainable model.

Both return a ``DeepFusionModel`` (keys ``encoder.clip.*``, ``encoder.projection.*``, ``decoder.*``):
``model(tokens (b, s), encoder_input={"images": (b, i, t, 3, H, W), "aspect_ratio": (b, i, 2)},
encoder_mask=bool (b, s, i * t * tokens_per_tile)) -> logits (b, s, vocab_size)``.

Which parts train: ``decoder_trainable``, ``encoder_trainable``, ``fusion_trainable`` (cross-attention layers, the
``<|image|>``-style fusion embeddings and the encoder's projection head). ``lora_attn_modules`` (e.g.
``[q_proj, v_proj]``) adds LoRA adapters to those attention projections of the decoder (self- and cross-attention);
the adapters always train.

``lora_llama3_2_vision_11b`` / ``lora_llama3_2_vision_tiny`` are torchtune's LoRA builders: each part
(``decoder_trainable``, ``encoder_trainable``, ``fusion_trainable``) is ``"lora"`` (adapters on its attention
projections named in ``lora_attn_modules``, on its MLP with ``apply_lora_to_mlp``, on its output projection with
``apply_lora_to_output``; the part's own weights frozen), ``"frozen"`` or ``"full"``. The decoder part is its
self-attention layers (and ``decoder.output``); the fusion part the cross-attention layers and the encoder's projection
head (and ``encoder.projection.output``); the encoder part the CLIP layers. As in torchtune's LoRA recipe, only the
adapters train when no part is ``"full"``: the fusion embeddings and the cross-attention gates stay frozen too.
``use_dora=True`` makes the adapters DoRA layers (a trainable magnitude per output feature besides ``lora_a`` and
``lora_b``), as torchtune's ``use_dora``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from mmtrain.models.llama3_2_vision._component_builders import llama3_2_vision_encoder
from mmtrain.models.llama3_2_vision._decoder import llama3_2_vision_decoder
from mmtrain.modules.fusion import DeepFusionModel
from mmtrain.modules.lora import LORA_ATTN_MODULES, apply_lora, apply_lora_to

__all__ = ["llama3_2_vision_11b", "llama3_2_vision_tiny", "lora_llama3_2_vision_11b", "lora_llama3_2_vision_tiny"]


def _finish(
    model: DeepFusionModel,
    lora_attn_modules: Sequence[str] | None,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
) -> DeepFusionModel:
    if lora_attn_modules:
        apply_lora(model, list(lora_attn_modules), rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                   scope="decoder")
    return model


def llama3_2_vision_11b(
    decoder_trainable: bool = False,
    encoder_trainable: bool = True,
    fusion_trainable: bool = True,
    image_size: int = 560,
    max_num_tiles: int = 4,
    lora_attn_modules: Sequence[str] | None = None,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    attention: dict[str, Any] | None = None,
) -> DeepFusionModel:
    """Llama 3.2 11B-Vision: CLIP ViT-H/14 (1280 wide, 32 layers, hidden states [3, 7, 15, 23, 30]) with an 8-layer
    projection head, and a 32-layer 4096-wide Llama 3.1 decoder (32 heads, 8 KV heads, SwiGLU 14336, vocab
    128256 + 8 special tokens) with a cross-attention layer fused before every 4th layer (8 in all).

    ``image_size`` is the tile size (560 for the instruct weights, 448 for the pretrained ones).
    """
    if image_size % 14 != 0:
        raise ValueError(f"image_size must be divisible by 14, the encoder patch size; got {image_size}")
    encoder = llama3_2_vision_encoder(
        patch_size=14,
        num_heads=16,
        clip_embed_dim=1280,
        clip_num_layers=32,
        clip_hidden_states=[3, 7, 15, 23, 30],
        num_layers_projection=8,
        decoder_embed_dim=4096,
        tile_size=image_size,
        max_num_tiles=max_num_tiles,
        in_channels=3,
        attention=attention,
    )
    decoder = llama3_2_vision_decoder(
        vocab_size=128_256,
        num_layers=32,
        fusion_interval=4,
        num_special_tokens=8,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        max_seq_len=131_072,
        encoder_max_seq_len=128_080,  # 20 images * 4 tiles * 1601 tokens
        rope_base=500_000,
        intermediate_dim=14_336,
        attention=attention,
    )
    model = DeepFusionModel(decoder=decoder, encoder=encoder, decoder_trainable=decoder_trainable,
                            encoder_trainable=encoder_trainable, fusion_trainable=fusion_trainable)
    return _finish(model, lora_attn_modules, lora_rank, lora_alpha, lora_dropout)


def llama3_2_vision_tiny(
    vocab_size: int = 128,
    num_special_tokens: int = 8,
    embed_dim: int = 64,
    num_layers: int = 4,
    fusion_interval: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_dim: int = 128,
    max_seq_len: int = 128,
    image_size: int = 32,
    patch_size: int = 8,
    max_num_tiles: int = 1,
    clip_embed_dim: int = 64,
    clip_num_layers: int = 2,
    clip_num_heads: int = 4,
    clip_hidden_states: Sequence[int] | None = (1,),
    num_layers_projection: int = 1,
    decoder_trainable: bool = True,
    encoder_trainable: bool = True,
    fusion_trainable: bool = True,
    lora_attn_modules: Sequence[str] | None = None,
    lora_rank: int = 4,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    attention: dict[str, Any] | None = None,
) -> DeepFusionModel:
    """The same architecture at toy size (about 0.4M parameters): trains from scratch on CPU in a minute.

    Defaults: 32x32 single-tile images in 8x8 patches (17 tokens per tile incl. CLS), a 2-layer 64-wide CLIP, a
    4-layer 64-wide decoder with a cross-attention layer before layers 2 and 4.
    """
    encoder = llama3_2_vision_encoder(
        patch_size=patch_size,
        num_heads=clip_num_heads,
        clip_embed_dim=clip_embed_dim,
        clip_num_layers=clip_num_layers,
        clip_hidden_states=list(clip_hidden_states) if clip_hidden_states else None,
        num_layers_projection=num_layers_projection,
        decoder_embed_dim=embed_dim,
        tile_size=image_size,
        max_num_tiles=max_num_tiles,
        in_channels=3,
        attention=attention,
    )
    tokens_per_tile = (image_size // patch_size) ** 2 + 1
    decoder = llama3_2_vision_decoder(
        vocab_size=vocab_size,
        num_layers=num_layers,
        fusion_interval=fusion_interval,
        num_special_tokens=num_special_tokens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        encoder_max_seq_len=4 * max_num_tiles * tokens_per_tile,
        rope_base=10_000,
        intermediate_dim=intermediate_dim,
        attention=attention,
    )
    model = DeepFusionModel(decoder=decoder, encoder=encoder, decoder_trainable=decoder_trainable,
                            encoder_trainable=encoder_trainable, fusion_trainable=fusion_trainable)
    return _finish(model, lora_attn_modules, lora_rank, lora_alpha, lora_dropout)


_LORA_PART_SETTINGS = ("lora", "full", "frozen")


def _lora_part(value: Any, name: str) -> str:
    """torchtune's ``LoRATrainable`` values ("lora", "full", "frozen", any case); True/False mean full/frozen."""
    if isinstance(value, bool):
        return "full" if value else "frozen"
    setting = str(value).lower()
    if setting not in _LORA_PART_SETTINGS:
        raise ValueError(f"{name} must be one of {list(_LORA_PART_SETTINGS)}, got {value!r}")
    return setting


def _lora_targets(model: DeepFusionModel, parts: dict[str, str], lora_attn_modules: Sequence[str],
                  apply_lora_to_mlp: bool, apply_lora_to_output: bool) -> list[str]:
    """Full names of the linear layers that torchtune's LoRA builders adapt, for the parts set to "lora"."""
    attention = set(lora_attn_modules)
    unknown = attention - set(LORA_ATTN_MODULES)
    if unknown:
        raise ValueError(f"lora_attn_modules: unknown {sorted(unknown)}; choose from {list(LORA_ATTN_MODULES)}")
    feed_forward = {"w1", "w2", "w3"} if apply_lora_to_mlp else set()
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if name in ("decoder.output", "encoder.projection.output"):
            part, wanted = ("decoder" if name.startswith("decoder.") else "fusion"), apply_lora_to_output
        else:
            if name.startswith("encoder.clip."):
                part = "encoder"
            elif name.startswith("encoder.") or ".fusion_layer." in name:
                part = "fusion"
            elif name.startswith("decoder.layers."):
                part = "decoder"
            else:
                continue
            leaf = name.rsplit(".", 1)[-1]
            wanted = leaf in attention or leaf in feed_forward
        if wanted and parts[part] == "lora":
            names.append(name)
    return names


def _with_lora(build: Any, *, lora_attn_modules: Sequence[str], decoder_trainable: Any, encoder_trainable: Any,
               fusion_trainable: Any, apply_lora_to_mlp: bool, apply_lora_to_output: bool, lora_rank: int,
               lora_alpha: float, lora_dropout: float, use_dora: bool, quantize_base: bool,
               **shapes: Any) -> DeepFusionModel:
    if quantize_base:
        raise ValueError("quantize_base (QLoRA: NF4 base weights) is not supported by mmtrain's LoRA builders; "
                         "use_dora (DoRA) and plain LoRA are")
    if not lora_attn_modules and not apply_lora_to_mlp and not apply_lora_to_output:
        raise ValueError("lora_attn_modules: name at least one of q_proj, k_proj, v_proj, output_proj (or set "
                         "apply_lora_to_mlp / apply_lora_to_output)")
    parts = {"decoder": _lora_part(decoder_trainable, "decoder_trainable"),
             "encoder": _lora_part(encoder_trainable, "encoder_trainable"),
             "fusion": _lora_part(fusion_trainable, "fusion_trainable")}
    model = build(decoder_trainable=parts["decoder"] == "full", encoder_trainable=parts["encoder"] == "full",
                  fusion_trainable=parts["fusion"] == "full", lora_attn_modules=None, **shapes)
    targets = _lora_targets(model, parts, list(lora_attn_modules or ()), apply_lora_to_mlp, apply_lora_to_output)
    apply_lora_to(model, targets, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, use_dora=use_dora)
    return model


def lora_llama3_2_vision_11b(
    lora_attn_modules: Sequence[str],
    decoder_trainable: str = "frozen",
    encoder_trainable: str = "lora",
    fusion_trainable: str = "lora",
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    image_size: int = 560,
    max_num_tiles: int = 4,
    attention: dict[str, Any] | None = None,
) -> DeepFusionModel:
    """torchtune's ``lora_llama3_2_vision_11b``: the 11B-Vision shapes of ``llama3_2_vision_11b`` with LoRA adapters
    on the parts set to "lora" (see the module docstring). Keys: the base model's plus ``<layer>.lora_a.weight``
    (rank, in) and ``<layer>.lora_b.weight`` (out, rank); with ``use_dora`` the adapters are torchtune's DoRA layers,
    which add ``<layer>.magnitude`` (out,). QLoRA (``quantize_base``) is refused."""
    return _with_lora(llama3_2_vision_11b, lora_attn_modules=lora_attn_modules, decoder_trainable=decoder_trainable,
                      encoder_trainable=encoder_trainable, fusion_trainable=fusion_trainable,
                      apply_lora_to_mlp=apply_lora_to_mlp, apply_lora_to_output=apply_lora_to_output,
                      lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora,
                      quantize_base=quantize_base, image_size=image_size, max_num_tiles=max_num_tiles,
                      attention=attention)


def lora_llama3_2_vision_tiny(
    lora_attn_modules: Sequence[str],
    decoder_trainable: str = "frozen",
    encoder_trainable: str = "lora",
    fusion_trainable: str = "lora",
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 4,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    **shapes: Any,
) -> DeepFusionModel:
    """``llama3_2_vision_tiny`` (its shape arguments pass through ``shapes``) with LoRA adapters as
    ``lora_llama3_2_vision_11b`` places them: for CPU runs and tests of LoRA fine-tuning."""
    return _with_lora(llama3_2_vision_tiny, lora_attn_modules=lora_attn_modules, decoder_trainable=decoder_trainable,
                      encoder_trainable=encoder_trainable, fusion_trainable=fusion_trainable,
                      apply_lora_to_mlp=apply_lora_to_mlp, apply_lora_to_output=apply_lora_to_output,
                      lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora,
                      quantize_base=quantize_base, **shapes)
