"""Deep fusion of a pretrained encoder into a pretrained decoder (torchtune's ``model_fusion``).

- ``FusionLayer(layer, fusion_layer)``: runs a new layer (gated cross-attention) before an original decoder layer;
  the original keeps its state-dict keys (``layers.N.attn...``), the new one is under ``layers.N.fusion_layer...``.
- ``FusionEmbedding(vocab_size, fusion_vocab_size, embed_dim)``: frozen original table (key ``weight``) plus a
  small trainable table for new tokens such as ``<|image|>`` (key ``fusion_embedding.weight``).
- ``DeepFusionModel(decoder, encoder)``: ``encoder(**encoder_input)`` -> (b, s_e, d) -> the decoder's
  cross-attention layers. Keys ``decoder.*`` and ``encoder.*``.

Shapes (DeepFusionModel.forward):
    tokens: long (b, s)
    encoder_input: dict of encoder inputs, e.g. ``images`` (b, n_imgs, n_tiles, c, h, w) and ``aspect_ratio``
        (b, n_imgs, 2); None after the first decoding step (cross-attention reads its cache)
    encoder_mask: bool (b, s, s_e), s_e = n_imgs * n_tiles * tokens_per_tile
    mask: bool (b, s, s_kv) or None (causal); input_pos: (s,) or (b, s) or None
    -> logits float32 (b, s, vocab)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "DeepFusionModel",
    "FusionEmbedding",
    "FusionLayer",
    "get_fusion_params",
    "register_fusion_module",
    "set_trainable_params",
]


class FusionLayer(nn.Module):
    """Wrap an original decoder ``layer`` with a new ``fusion_layer`` (run first when ``fusion_first``).

    Shapes: x (b, s, d) -> (b, s, d); keyword arguments are passed to both layers.
    """

    def __init__(self, layer: nn.Module, fusion_layer: nn.Module, fusion_first: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.fusion_layer = fusion_layer
        self.fusion_first = fusion_first
        # Keep the wrapper out of the state dict: the original layer's keys stay what the pretrained checkpoint has.
        self.register_state_dict_post_hook(FusionLayer._drop_layer_prefix)
        self.register_load_state_dict_pre_hook(FusionLayer._add_layer_prefix)

    @staticmethod
    def _drop_layer_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        for key in list(state_dict.keys()):
            if key.startswith(prefix + "layer."):
                state_dict[prefix + key[len(prefix) + len("layer."):]] = state_dict.pop(key)

    @staticmethod
    def _add_layer_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for key in list(state_dict.keys()):
            if not key.startswith(prefix):
                continue
            local = key[len(prefix):]
            if not local.startswith("fusion_layer.") and not local.startswith("layer."):
                state_dict[prefix + "layer." + local] = state_dict.pop(key)

    def _load_fqn_modifiers(self) -> dict[str, str]:
        # For set_model_state_dict (CheckpointManager.load): state-dict names under the wrapped layer -> "layer".
        return {name: "layer" for name, _ in self.layer.named_children()}

    def __getattr__(self, name: str) -> Any:
        # State-dict keys omit ``layer.``; tools that walk those keys as attribute paths (torch.distributed
        # checkpoint's get_model_state_dict) find the wrapped layer's children here.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def setup_caches(self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int,
                     decoder_max_seq_len: int) -> None:
        for part in (self.layer, self.fusion_layer):
            part.setup_caches(batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len,
                              decoder_max_seq_len=decoder_max_seq_len)

    def caches_are_setup(self) -> bool:
        return self.layer.caches_are_setup()

    def caches_are_enabled(self) -> bool:
        return self.layer.caches_are_enabled()

    def reset_cache(self) -> None:
        self.layer.reset_cache()
        self.fusion_layer.reset_cache()

    def fusion_params(self) -> list[str]:
        return [f"fusion_layer.{name}" for name, _ in self.fusion_layer.named_parameters()]

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.fusion_first:
            return self.layer(self.fusion_layer(x, **kwargs), **kwargs)
        return self.fusion_layer(self.layer(x, **kwargs), **kwargs)


class FusionEmbedding(nn.Module):
    """Token embedding with ``vocab_size`` original rows and ``fusion_vocab_size`` new rows.

    Ids ``[0, vocab_size)`` read the original table, ids ``[vocab_size, vocab_size + fusion_vocab_size)`` the
    fusion table. Both tables are looked up for every token and one is selected: no data-dependent shapes, so
    ``torch.compile`` keeps one graph.

    Shapes: long (b, s) -> (b, s, embed_dim).
    """

    def __init__(self, vocab_size: int, fusion_vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.fusion_embedding = nn.Embedding(fusion_vocab_size, embed_dim)
        self.dim = embed_dim
        self.num_embeddings = vocab_size + fusion_vocab_size
        self.register_state_dict_post_hook(FusionEmbedding._drop_embedding_prefix)
        self.register_load_state_dict_pre_hook(FusionEmbedding._add_embedding_prefix)

    @staticmethod
    def _drop_embedding_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        if prefix + "embedding.weight" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "embedding.weight")

    @staticmethod
    def _add_embedding_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        if prefix + "weight" in state_dict:
            state_dict[prefix + "embedding.weight"] = state_dict.pop(prefix + "weight")

    @property
    def weight(self) -> nn.Parameter:
        """The original table, under the key the state dict uses (attribute-path walkers find it here)."""
        return self.embedding.weight

    def _load_fqn_modifiers(self) -> dict[str, str]:
        # For set_model_state_dict (CheckpointManager.load): the state-dict name ``weight`` lives in ``embedding``.
        return {"weight": "embedding"}

    def fusion_params(self) -> list[str]:
        return ["fusion_embedding.weight"]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        vocab_size = self.embedding.num_embeddings
        is_original = input < vocab_size
        original = self.embedding(input.clamp(max=vocab_size - 1))
        fusion = self.fusion_embedding((input - vocab_size).clamp(min=0, max=self.fusion_embedding.num_embeddings - 1))
        return torch.where(is_original.unsqueeze(-1), original, fusion)


def register_fusion_module(module: nn.Module) -> None:
    """Mark every parameter of ``module`` as a fusion parameter (e.g. the encoder's projection head)."""

    def fusion_params(self: nn.Module = module) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    module.fusion_params = fusion_params  # type: ignore[attr-defined]


def get_fusion_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Full names -> parameters of every module that declares ``fusion_params()``."""
    params = dict(model.named_parameters())
    fusion: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        declared = getattr(module, "fusion_params", None)
        if callable(declared):
            locals_ = declared()
        elif getattr(module, "_fusion_module", False):  # marked by the vision encoder for its projection head
            locals_ = [name for name, _ in module.named_parameters()]
        else:
            continue
        for local in locals_:
            full = f"{module_name}.{local}" if module_name else local
            if full in params:
                fusion[full] = params[full]
    return fusion


def set_trainable_params(model: nn.Module, trainable: Iterable[str]) -> None:
    """``requires_grad`` True exactly for the named parameters."""
    names = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def _trainable_flag(value: Any, name: str) -> bool:
    """True/False, or torchtune's "full"/"frozen" (a plain truth test would make "frozen" trainable)."""
    if isinstance(value, bool):
        return value
    if value == "full":
        return True
    if value == "frozen":
        return False
    if value == "lora":
        raise ValueError(f"{name}='lora' needs the LoRA builders (lora_llama3_2_vision_11b / _tiny, as torchtune's), "
                         "which add the adapters; DeepFusionModel takes True/False, 'full' or 'frozen'")
    raise ValueError(f"{name} must be True, False, 'full' or 'frozen', got {value!r}")


class DeepFusionModel(nn.Module):
    """An encoder fused into a decoder whose cross-attention layers read the encoder output.

    Args:
        decoder: a ``TransformerDecoder`` with ``FusionLayer``s / ``FusionEmbedding``.
        encoder: module called as ``encoder(**encoder_input)`` -> (b, s_e, d).
        decoder_trainable, encoder_trainable: train the original decoder / encoder weights.
        fusion_trainable: train the fusion parameters (cross-attention layers, fusion embeddings, the encoder's
            projection head). Fusion parameters follow this flag whatever the other two say.
    """

    def __init__(
        self,
        decoder: nn.Module,
        encoder: nn.Module,
        *,
        decoder_trainable: bool = False,
        encoder_trainable: bool = False,
        fusion_trainable: bool = True,
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        # The projection head maps the encoder into the decoder's width: new weights, so a fusion module.
        projection = getattr(encoder, "projection", None)
        if isinstance(projection, nn.Module) and not callable(getattr(projection, "fusion_params", None)) \
                and not getattr(projection, "_fusion_module", False):
            register_fusion_module(projection)
        decoder_trainable = _trainable_flag(decoder_trainable, "decoder_trainable")
        encoder_trainable = _trainable_flag(encoder_trainable, "encoder_trainable")
        fusion_trainable = _trainable_flag(fusion_trainable, "fusion_trainable")
        trainable: set[str] = set()
        if encoder_trainable:
            trainable |= {f"encoder.{n}" for n, _ in encoder.named_parameters()}
        if decoder_trainable:
            trainable |= {f"decoder.{n}" for n, _ in decoder.named_parameters()}
        fusion = set(get_fusion_params(self))
        trainable = trainable | fusion if fusion_trainable else trainable - fusion
        set_trainable_params(self, trainable)

    def setup_caches(self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int | None = None,
                     decoder_max_seq_len: int | None = None) -> None:
        self.decoder.setup_caches(batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len,
                                  decoder_max_seq_len=decoder_max_seq_len)

    def caches_are_setup(self) -> bool:
        return self.decoder.caches_are_setup()

    def caches_are_enabled(self) -> bool:
        return self.decoder.caches_are_enabled()

    def reset_caches(self) -> None:
        self.decoder.reset_caches()

    def delete_caches(self) -> None:
        self.decoder.delete_caches()

    def get_output_proj_weights(self) -> torch.Tensor:
        return self.decoder.get_output_proj_weights()

    def layer_modules(self) -> list[nn.Module]:
        """The repeated blocks (encoder layers, decoder layers) for per-layer sharding, checkpointing, compile."""
        blocks: list[nn.Module] = []
        if callable(getattr(self.encoder, "layer_modules", None)):
            blocks.extend(self.encoder.layer_modules())
        blocks.extend(self.decoder.layers)
        return blocks

    def encode(self, encoder_input: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encoder output (b, s_e, d) for the decoder's cross-attention."""
        return self.encoder(**encoder_input)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        encoder_input: dict[str, torch.Tensor] | None = None,
        encoder_mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        encoder_embed = self.encoder(**encoder_input) if encoder_input is not None else None
        return self.decoder(tokens, mask=mask, encoder_input=encoder_embed, encoder_mask=encoder_mask,
                            input_pos=input_pos)
