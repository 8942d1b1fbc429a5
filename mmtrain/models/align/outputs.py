"""Output containers that behave like HF transformers' ``ModelOutput``: an ordered mapping of the fields that are
not None (``keys()``/``values()``/``items()``, ``"name" in out``, ``len(out)``, iteration over the names,
``out["name"]`` raising ``KeyError`` for a field that is None), ``out[i]``/``out[a:b]`` over the same fields,
``to_tuple()``, and attribute access to every field.

They stay plain dataclasses (not dict subclasses), so ``torch.compile`` traces their construction like any
dataclass.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from dataclasses import dataclass, fields
from typing import Any

import torch


class ModelOutput:
    def _present(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)  # type: ignore[arg-type]
                if getattr(self, f.name) is not None}

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self._present().values())

    def keys(self) -> KeysView[str]:
        return self._present().keys()

    def values(self) -> ValuesView[Any]:
        return self._present().values()

    def items(self) -> ItemsView[str, Any]:
        return self._present().items()

    def get(self, key: str, default: Any = None) -> Any:
        return self._present().get(key, default)

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            return self._present()[key]
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in {f.name for f in fields(self)}:  # type: ignore[arg-type]
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self._present()

    def __len__(self) -> int:
        return len(self._present())

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())


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
    towers' outputs.

    ``to_tuple()`` and ``out[i]`` give the towers' outputs as tuples too (HF's rule, so that the tuple form holds
    no output objects); ``values()``/``out["text_model_output"]`` give the objects themselves."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPoolingAndCrossAttentions | tuple | None = None
    vision_model_output: BaseModelOutputWithPoolingAndNoAttention | tuple | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in self.values())
