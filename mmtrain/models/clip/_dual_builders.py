"""Builders for CLIP and SigLIP dual encoders (plain functions with keyword arguments, as in torchtune).

    clip_tiny()        a few-thousand-parameter model for CPU tests and demos (32 px, 2 + 2 layers)
    clip_vit_b16()     open_clip ``ViT-B-16``: ViT-B/16 at 224 px (width 768, 12 layers, 12 heads), text width 512,
                       12 layers, 8 heads, context 77, joint embedding 512, logit scale init log(1/0.07)
    siglip_vit_b16()   SigLIP ViT-B/16 at 224 px with a width-768 text tower (context 64), joint embedding 768,
                       logit scale init log(10), logit bias init -10

All return a ``CLIPDualEncoder`` (see ``_dual_encoder``): ``encode_image (B, 3, S, S) -> (B, D)``,
``encode_text (B, L), (B, L) -> (B, D)``. ``attention`` (a registry config, e.g. ``{"name": "local",
"window_size": 9}``) goes to every attention layer of both towers. ``vocab_size`` must match the tokenizer.
Differences from the peers' pretrained models, on purpose: the image tower pools with CLS + projection (torchtune's
``CLSProjection``) in both families (SigLIP's attention-pool head is not reproduced), and the text tower pools at the
last real token (``pool="eot"``), which is right for any tokenizer that appends an end token. ``siglip_vit_b16``
differs from open_clip's ``ViT-B-16-SigLIP`` in more than that (causal text attention, biases, LayerNorm eps):
its docstring lists every difference.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from mmtrain.models.clip._dual_encoder import CLIPDualEncoder
from mmtrain.models.clip._text_encoder import CLIPTextEncoder

__all__ = ["clip_dual_encoder", "clip_tiny", "clip_vit_b16", "siglip_tiny", "siglip_vit_b16"]

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def clip_dual_encoder(
    *,
    image_size: int,
    patch_size: int,
    vision_width: int,
    vision_layers: int,
    vision_heads: int,
    vocab_size: int,
    context_length: int,
    text_width: int,
    text_layers: int,
    text_heads: int,
    embed_dim: int,
    activation: type[nn.Module] = nn.GELU,
    attention: dict[str, Any] | None = None,
    text_pool: str = "eot",
    pad_token_id: int | None = 0,
    init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
    init_logit_bias: float | None = None,
    max_logit_scale: float = 100.0,
) -> CLIPDualEncoder:
    """Wire a single-tile ``clip_vision_encoder`` (with CLS projection to ``embed_dim``) and a ``CLIPTextEncoder``.

    ``pad_token_id`` (default 0, the [PAD] id of mmtrain's WordPiece tokenizers and open_clip's BPE pad value) is
    what ``encode_text(input_ids)`` without a mask treats as padding; None treats every position as real.
    """
    from mmtrain.models.clip._component_builders import clip_vision_encoder

    if image_size % patch_size != 0:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    vision = clip_vision_encoder(
        tile_size=image_size,
        patch_size=patch_size,
        embed_dim=vision_width,
        num_layers=vision_layers,
        num_heads=vision_heads,
        activation=activation,
        cls_output_dim=embed_dim,
        output_cls_projection=True,
        max_num_tiles=1,
        attention=attention,
    )
    text = CLIPTextEncoder(
        vocab_size=vocab_size,
        max_seq_len=context_length,
        embed_dim=text_width,
        num_layers=text_layers,
        num_heads=text_heads,
        output_dim=embed_dim,
        activation=activation,
        attention=attention,
        pool=text_pool,
        pad_token_id=pad_token_id,
    )
    return CLIPDualEncoder(
        vision,
        text,
        init_logit_scale=init_logit_scale,
        init_logit_bias=init_logit_bias,
        max_logit_scale=max_logit_scale,
        embed_dim=embed_dim,
    )


def clip_tiny(
    *,
    vocab_size: int = 30522,
    image_size: int = 32,
    context_length: int = 32,
    embed_dim: int = 32,
    attention: dict[str, Any] | None = None,
    siglip: bool = False,
    pad_token_id: int | None = 0,
) -> CLIPDualEncoder:
    """Tiny CLIP (or SigLIP with ``siglip=True``) for CPU tests: width 32, 2 layers and 2 heads per tower."""
    return clip_dual_encoder(
        image_size=image_size,
        patch_size=8,
        vision_width=32,
        vision_layers=2,
        vision_heads=2,
        vocab_size=vocab_size,
        context_length=context_length,
        text_width=32,
        text_layers=2,
        text_heads=2,
        embed_dim=embed_dim,
        attention=attention,
        pad_token_id=pad_token_id,
        init_logit_scale=SIGLIP_INIT_LOGIT_SCALE if siglip else CLIP_INIT_LOGIT_SCALE,
        init_logit_bias=SIGLIP_INIT_LOGIT_BIAS if siglip else None,
    )


def siglip_tiny(**kwargs: Any) -> CLIPDualEncoder:
    """``clip_tiny(siglip=True, ...)``."""
    return clip_tiny(siglip=True, **kwargs)


def clip_vit_b16(
    *,
    vocab_size: int = 49408,
    context_length: int = 77,
    image_size: int = 224,
    attention: dict[str, Any] | None = None,
    text_pool: str = "eot",
    pad_token_id: int | None = 0,
) -> CLIPDualEncoder:
    """open_clip's ``ViT-B-16`` shapes (about 150M parameters with the 49408-token BPE vocabulary)."""
    return clip_dual_encoder(
        image_size=image_size,
        patch_size=16,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        vocab_size=vocab_size,
        context_length=context_length,
        text_width=512,
        text_layers=12,
        text_heads=8,
        embed_dim=512,
        attention=attention,
        text_pool=text_pool,
        pad_token_id=pad_token_id,
    )


def siglip_vit_b16(
    *,
    vocab_size: int = 32000,
    context_length: int = 64,
    image_size: int = 224,
    attention: dict[str, Any] | None = None,
    text_pool: str = "eot",
    pad_token_id: int | None = 0,
) -> CLIPDualEncoder:
    """SigLIP ViT-B/16 shapes: both towers width 768, 12 layers, 12 heads; joint embedding 768.

    Same widths, depths and heads as open_clip's ``ViT-B-16-SigLIP``, but not the same network: 196,660,226
    parameters at vocab_size 32000 against open_clip's 203,155,970, and its weights do not load. The differences
    (open_clip -> here):

    - image head: attention pool (MAP, ``AttentionPoolLatent``) -> CLS token + linear projection
      (image tower 92,884,224 -> 86,389,248 parameters)
    - LayerNorm before the image blocks: none -> ``ln_pre``
    - patch-embedding conv bias: yes -> no
    - text attention: bidirectional (``no_causal_mask``) -> causal
    - text pooling: the last position (``pool_type="last"``) -> the last real token (``text_pool="eot"``)
    - text projection bias: yes -> no (text tower 110,271,744 -> 110,270,976 parameters)
    - LayerNorm eps: 1e-6 -> 1e-5

    Initial logit scale log(10) and bias -10 are those open_clip_train sets with ``--siglip`` (open_clip's
    ``create_model`` alone gives log(1/0.07)).
    """
    return clip_dual_encoder(
        image_size=image_size,
        patch_size=16,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        vocab_size=vocab_size,
        context_length=context_length,
        text_width=768,
        text_layers=12,
        text_heads=12,
        embed_dim=768,
        attention=attention,
        text_pool=text_pool,
        pad_token_id=pad_token_id,
        init_logit_scale=SIGLIP_INIT_LOGIT_SCALE,
        init_logit_bias=SIGLIP_INIT_LOGIT_BIAS,
    )
