"""``AlignModel``: EfficientNet image tower + BERT text tower with a text projection, contrasted with a learnable
temperature. Also the dual-encoder interface the contrastive recipe uses.

Shapes:
    input_ids, attention_mask, token_type_ids: (B_txt, L)
    pixel_values: (B_img, 3, H, W)
    text_embeds:  (B_txt, P)  = normalize(text_projection(last_hidden_state[:, 0]))
    image_embeds: (B_img, P)  = normalize(vision pooler_output); P == vision width, no image projection
    logits_per_text: (B_txt, B_img) = text_embeds @ image_embeds.T / temperature;  logits_per_image = its .T
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.models.align.configuration import AlignConfig
from mmtrain.models.align.outputs import AlignOutput
from mmtrain.models.align.text import AlignTextModel
from mmtrain.models.align.vision import AlignVisionModel


def align_loss(logits_per_text: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Mean of the text->image and image->text cross-entropies with label smoothing. (B, B) -> 0-dim."""
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    caption_loss = F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    image_loss = F.cross_entropy(logits_per_text.t(), labels, label_smoothing=label_smoothing)
    return (caption_loss + image_loss) / 2.0


class AlignModel(nn.Module):
    """The ALIGN dual encoder (HF ``AlignModel``'s API) plus ``encode_image``/``encode_text``/``get_logit_scale``/
    ``get_logit_bias``/``layer_modules``.

    Args:
        config: ``AlignConfig``. ``projection_dim`` must equal the vision tower's output width.
        attention: attention-registry config for the text tower's self-attention (None = dense SDPA).
    """

    def __init__(self, config: AlignConfig, attention: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.text_model = AlignTextModel(config.text_config, attention=attention)
        self.vision_model = AlignVisionModel(config.vision_config)
        if self.vision_model.hidden_size != config.projection_dim:
            raise ValueError(
                f"projection_dim ({config.projection_dim}) must equal the vision output width "
                f"({self.vision_model.hidden_size} = round_filters(out_channels[-1])): ALIGN has no image projection")
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim)
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature_init_value)))
        self._init_head()

    def _init_head(self) -> None:
        nn.init.xavier_uniform_(self.text_projection.weight)
        nn.init.zeros_(self.text_projection.bias)
        with torch.no_grad():
            self.temperature.fill_(float(self.config.temperature_init_value))

    def reset_parameters(self) -> None:
        self.text_model.reset_parameters()
        self.vision_model.reset_parameters()
        self._init_head()

    # ---- HF API -------------------------------------------------------------------------------------------------
    def get_text_features(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                          token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                          head_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                          output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                          return_dict: bool | None = None) -> torch.Tensor:
        """(B, L) -> (B, P): projection of the [CLS] state (not normalized). ``head_mask``/``output_attentions``
        change the text tower's computation as in ``AlignTextModel``; only the features are returned."""
        text_outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                       token_type_ids=token_type_ids, position_ids=position_ids,
                                       head_mask=head_mask, inputs_embeds=inputs_embeds,
                                       output_attentions=self._flag("output_attentions", output_attentions),
                                       output_hidden_states=self._flag("output_hidden_states", output_hidden_states),
                                       return_dict=True)
        return self.text_projection(text_outputs.last_hidden_state[:, 0, :])

    def get_image_features(self, pixel_values: torch.Tensor | None = None,
                           output_hidden_states: bool | None = None,
                           return_dict: bool | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P): pooled vision output (not normalized)."""
        return self.vision_model(pixel_values=pixel_values, output_hidden_states=False, return_dict=True).pooler_output

    def _flag(self, name: str, value: bool | None) -> bool:
        """A forward argument, or the AlignConfig's value of the same name when it is None (HF's rule)."""
        return bool(getattr(self.config, name)) if value is None else bool(value)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> AlignOutput | tuple:
        """Shapes in the module docstring. ``output_attentions``/``output_hidden_states``/``return_dict`` fall back
        to the AlignConfig's values; with ``return_dict=False`` the towers' outputs are tuples too (as in HF)."""
        output_attentions = self._flag("output_attentions", output_attentions)
        output_hidden_states = self._flag("output_hidden_states", output_hidden_states)
        return_dict = self._flag("return_dict", return_dict)
        vision_outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=output_hidden_states,
                                           return_dict=True)
        text_outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                       token_type_ids=token_type_ids, position_ids=position_ids,
                                       head_mask=head_mask, inputs_embeds=inputs_embeds,
                                       output_attentions=output_attentions,
                                       output_hidden_states=output_hidden_states, return_dict=True)
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = F.normalize(self.text_projection(text_outputs.last_hidden_state[:, 0, :]), dim=-1)
        logits_per_text = text_embeds @ image_embeds.t() / self.temperature
        logits_per_image = logits_per_text.t()
        loss = align_loss(logits_per_text) if return_loss else None
        if not return_dict:
            text_outputs, vision_outputs = text_outputs.to_tuple(), vision_outputs.to_tuple()
        out = AlignOutput(loss=loss, logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                          text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_outputs,
                          vision_model_output=vision_outputs)
        return out if return_dict else out.to_tuple()

    # ---- dual-encoder interface ---------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P), L2-normalized."""
        return F.normalize(self.get_image_features(pixel_values), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) long, (B, L) -> (B, P), L2-normalized."""
        return F.normalize(self.get_text_features(input_ids=input_ids, attention_mask=attention_mask), dim=-1)

    def get_logit_scale(self) -> torch.Tensor:
        """0-dim multiplier of cosine similarities: 1 / temperature."""
        return 1.0 / self.temperature

    def get_logit_bias(self) -> None:
        return None

    def unused_contrastive_parameters(self) -> list[nn.Parameter]:
        """Parameters that ``encode_image`` / ``encode_text`` never reach: BERT's tanh pooler (HF computes it and
        drops it too). The contrastive recipe freezes them, so DDP can skip its per-step search for unused ones."""
        pooler = getattr(self.text_model, "pooler", None)
        return list(pooler.parameters()) if pooler is not None else []

    def layer_modules(self) -> list[nn.Module]:
        """BERT layers then MBConv blocks (units for FSDP2 sharding, activation checkpointing, regional compile)."""
        return self.text_model.layer_modules() + self.vision_model.layer_modules()

    # ---- checkpoints --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory, config: AlignConfig | None = None, **kwargs: Any) -> AlignModel:
        """Load an HF-layout folder: config.json + model.safetensors (or pytorch_model.bin, read with
        ``weights_only=True``). ``dtype`` (or its older name ``torch_dtype``): a ``torch.dtype``, its name, or
        ``"auto"`` (the default: config.json's ``dtype``, else the checkpoint's own), as in HF 5.x; other ``kwargs``
        (e.g. ``attention``) go to the constructor."""
        from mmtrain.models.align.checkpoint import load_pretrained

        return load_pretrained(cls, directory, config=config, **kwargs)

    def save_pretrained(self, directory, safe_serialization: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write config.json + model.safetensors with HF's state-dict keys (``state_dict``: the weights to write,
        default this model's own)."""
        from mmtrain.models.align.checkpoint import save_pretrained

        save_pretrained(self, directory, safe_serialization=safe_serialization, state_dict=state_dict)
