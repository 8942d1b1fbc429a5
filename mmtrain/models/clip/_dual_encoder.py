"""CLIP / SigLIP dual encoder: a ViT image tower and a causal text tower mapped into one embedding space.

Implements mmtrain's dual-encoder interface (what the contrastive recipe uses):

    encode_image(pixel_values (B, 3, H, W)) -> (B, D), L2-normalized
    encode_text(input_ids (B, L) long, attention_mask (B, L)) -> (B, D), L2-normalized
    get_logit_scale() -> 0-dim tensor: exp(logit_scale), its value clamped at ``max_logit_scale``
    clamp_logit_scale_() -> None: the parameter clamped in place to [0, log(max_logit_scale)] (after each step)
    get_logit_bias() -> 0-dim tensor (SigLIP) or None (CLIP)
    layer_modules() -> the transformer layers of both towers (FSDP2 units, checkpointing, regional compile)
    forward(pixel_values, input_ids, attention_mask) -> (image_embeds (B, D), text_embeds (B, D))

The image tower is a torchtune-style ``VisionTransformer`` (``clip_vision_encoder`` with ``cls_projection``). It
takes tiled images ``(B, n_imgs, n_tiles, 3, tile, tile)`` and returns ``(x, hidden_states)``; a plain image is a
single tile of a single image, so ``(B, 3, H, W)`` is viewed as ``(B, 1, 1, 3, H, W)`` (no copy) and the CLS
projection ``(B, 1, 1, 1, D)`` is flattened to ``(B, D)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIPDualEncoder"]


def _layers_of(module: nn.Module) -> list[nn.Module]:
    layers = getattr(module, "layers", None)
    if layers is None:
        raise AttributeError(f"{type(module).__name__} has no 'layers' to shard or checkpoint")
    return list(layers)


class CLIPDualEncoder(nn.Module):
    """Image and text towers with a learnable temperature (CLIP) and optionally a learnable bias (SigLIP).

    Args:
        vision_encoder: module mapping ``(B, 1, 1, 3, H, W)`` to ``(B, 1, 1, 1, D)`` (or a tuple whose first item
            is that), e.g. ``clip_vision_encoder(..., output_cls_projection=True, max_num_tiles=1)``.
        text_encoder: module mapping ``input_ids (B, L), attention_mask (B, L)`` to ``(B, D)``.
        init_logit_scale: initial value of the log-scale parameter (CLIP ``log(1/0.07)``, SigLIP ``log(10)``).
        init_logit_bias: initial logit bias (SigLIP ``-10``); None for no bias (CLIP).
        max_logit_scale: ceiling of ``get_logit_scale`` (CLIP's 100). The trainer calls ``clamp_logit_scale_`` after
            every optimizer step, as open_clip does; the forward clamp only guards the value in between.
        embed_dim: joint embedding width D (checked against the towers' outputs).
    """

    def __init__(
        self,
        vision_encoder: nn.Module,
        text_encoder: nn.Module,
        *,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = None,
        max_logit_scale: float = 100.0,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.embed_dim = embed_dim
        self.max_logit_scale = max_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        if init_logit_bias is None:
            self.register_parameter("logit_bias", None)
        else:
            self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def _check_dim(self, features: torch.Tensor, tower: str) -> None:
        if self.embed_dim is not None and features.shape[-1] != self.embed_dim:
            raise ValueError(f"{tower} tower outputs width {features.shape[-1]}, expected embed_dim={self.embed_dim}")

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D), before normalization."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        batch = pixel_values.shape[0]
        out = self.vision_encoder(pixel_values[:, None, None])
        if isinstance(out, (tuple, list)):
            out = out[0]
        features = out.reshape(batch, -1)
        self._check_dim(features, "image")
        return features

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L), (B, L) -> (B, D), before normalization."""
        features = self.text_encoder(input_ids, attention_mask)
        self._check_dim(features, "text")
        return features

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D), unit L2 norm."""
        return F.normalize(self.image_features(pixel_values), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) long, (B, L) -> (B, D), unit L2 norm."""
        return F.normalize(self.text_features(input_ids, attention_mask), dim=-1)

    def get_logit_scale(self) -> torch.Tensor:
        """0-dim multiplier of cosine similarities: ``exp(logit_scale)``, at most ``max_logit_scale``.

        The clamp is straight-through: the value is ``min(exp(logit_scale), max)`` but the gradient is that of
        ``exp(logit_scale)``. A clamp inside the graph would give zero gradient above the ceiling, so a parameter
        that an optimizer step carried past log(max) could never come back down.
        """
        scale = self.logit_scale.exp()
        detached = scale.detach()
        # clamp(s) + (s - s) is exactly clamp(s) in value, and differentiates like s
        return detached.clamp(max=self.max_logit_scale) + (scale - detached)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the ``logit_scale`` parameter in place to [0, log(max_logit_scale)] (scale in [1, max]).

        Call after every optimizer step: at the bound the parameter still gets a gradient and can move back.
        """
        self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))

    def get_logit_bias(self) -> torch.Tensor | None:
        return self.logit_bias

    def unused_contrastive_parameters(self) -> list[nn.Parameter]:
        """None: the contrastive step reaches every parameter (DDP need not search for unused ones)."""
        return []

    def layer_modules(self) -> list[nn.Module]:
        return _layers_of(self.vision_encoder) + _layers_of(self.text_encoder)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image_embeds (B, D), text_embeds (B, D)), both L2-normalized. One call for DDP (see
        ``mmtrain.training.distributed.dual_encoder_forward``)."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)
