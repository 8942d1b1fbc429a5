"""Output containers shaped like HF transformers' ``ModelOutput``: attribute access, ``out["name"]`` and
``out[i]`` over the fields that are not None, and ``to_tuple()``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


class ModelOutput:
    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)  # type: ignore[arg-type]

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    """Text tower: ``last_hidden_state (B, L, H)``, ``pooler_output (B, H)``, ``hidden_states`` (embeddings +
    each layer, each ``(B, L, H)``)."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    """Text tower (what ``AlignTextModel`` returns, as on the HF page): ``last_hidden_state (B, L, H)``,
    ``pooler_output (B, H)``, ``hidden_states`` (embeddings + each layer, each ``(B, L, H)``), ``attentions`` (one
    ``(B, heads, L, L)`` softmax probability tensor per layer). ``past_key_values`` and ``cross_attentions`` are
    always None: ALIGN's BERT is an encoder without cross-attention or a cache."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    past_key_values: tuple[tuple[torch.Tensor, ...], ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class BaseModelOutputWithPoolingAndNoAttention(ModelOutput):
    """Vision tower: ``last_hidden_state (B, C, h, w)``, ``pooler_output (B, C)``, ``hidden_states`` (stem +
    each block, each ``(B, C_i, h_i, w_i)``)."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class AlignOutput(ModelOutput):
    """``loss`` 0-dim (with ``return_loss``), ``logits_per_image (B_img, B_txt)``, ``logits_per_text
    (B_txt, B_img)``, ``text_embeds (B_txt, P)`` and ``image_embeds (B_img, P)`` (L2-normalized), and the
    towers' outputs."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPoolingAndCrossAttentions | tuple | None = None
    vision_model_output: BaseModelOutputWithPoolingAndNoAttention | tuple | None = None
