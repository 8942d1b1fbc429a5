"""A decoder-only transformer (torchtune's ``TransformerDecoder``): embeddings, a stack of layers, norm, output.

State-dict keys as torchtune: ``tok_embeddings.*``, ``layers.N.*``, ``norm.*``, ``output.*``.

Shapes:
    tokens: long (b, s)
    mask: bool (b, s, s_kv) or None          self-attention mask, True attends; None = causal. With KV caches,
                                             s_kv is the number of positions cached after this call; a mask
                                             over the whole cache length (torchtune's) is cropped to them.
    encoder_input: (b, s_e, d) or None       encoder output for cross-attention layers (None after the first
                                             decoding step: cross-attention then reads its cache)
    encoder_mask: bool (b, s, s_e) or None   True where text token i may attend to encoder token j (columns
                                             past s_e, e.g. from the collator's pad_max_images, are cropped)
    input_pos: long (s,) or (b, s) or None   positions for RoPE (None = 0..s-1, or continuing the cache)
    -> logits float32 (b, s, vocab)  (or hidden states (b, s, d) when ``skip_output_projection``)
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class TransformerDecoder(nn.Module):
    """Token embeddings -> layers -> norm -> output projection.

    Args:
        tok_embeddings: ``nn.Embedding`` or ``FusionEmbedding``.
        layers: one layer (cloned ``num_layers`` times) or a list of layers.
        max_seq_len: longest token sequence accepted.
        num_heads: query heads (kept for callers that size caches or masks).
        head_dim: per-head width.
        norm: final norm (RMSNorm).
        output: projection to vocabulary logits.
        num_layers: number of clones when ``layers`` is a single module.
        output_hidden_states: indices of layers whose inputs are also returned.
    """

    def __init__(
        self,
        *,
        tok_embeddings: nn.Module,
        layers: nn.Module | list[nn.Module] | nn.ModuleList,
        max_seq_len: int,
        num_heads: int,
        head_dim: int,
        norm: nn.Module,
        output: nn.Module,
        num_layers: int | None = None,
        output_hidden_states: list[int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(layers, nn.Module) and not isinstance(layers, nn.ModuleList):
            if num_layers is None:
                raise ValueError("num_layers is required when a single layer is given")
            layers = [copy.deepcopy(layers) for _ in range(num_layers)]
        self.tok_embeddings = tok_embeddings
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.output = output
        self.output_hidden_states = list(output_hidden_states or [])
        self.max_seq_len = max_seq_len
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.skip_output_projection = False
        self.encoder_max_cache_seq_len: int | None = None
        self.decoder_max_cache_seq_len: int | None = None

    # ---- KV caches (inference) -------------------------------------------------------------------------------
    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
    ) -> None:
        """Give every attention a KV cache: self-attention ``decoder_max_seq_len`` positions, cross-attention
        ``encoder_max_seq_len`` (both default to ``max_seq_len``)."""
        self.encoder_max_cache_seq_len = encoder_max_seq_len or self.max_seq_len
        self.decoder_max_cache_seq_len = decoder_max_seq_len or self.max_seq_len
        for layer in self.layers:
            layer.setup_caches(
                batch_size,
                dtype,
                encoder_max_seq_len=self.encoder_max_cache_seq_len,
                decoder_max_seq_len=self.decoder_max_cache_seq_len,
            )

    def caches_are_setup(self) -> bool:
        return bool(self.layers) and self.layers[0].caches_are_setup()

    def caches_are_enabled(self) -> bool:
        return bool(self.layers) and self.layers[0].caches_are_enabled()

    def reset_caches(self) -> None:
        """Empty the caches (keeps the buffers)."""
        if not self.caches_are_setup():
            raise RuntimeError("Key value caches are not setup. Call model.setup_caches first.")
        for layer in self.layers:
            layer.reset_cache()

    def delete_caches(self) -> None:
        """Remove the caches so that forward runs without them again (training, or the uncached reference)."""
        for module in self.modules():
            if hasattr(module, "kv_cache"):
                module.kv_cache = None
        self.encoder_max_cache_seq_len = None
        self.decoder_max_cache_seq_len = None

    def get_output_proj_weights(self) -> torch.Tensor:
        return self.output.weight

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        encoder_input: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        seq_len = tokens.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(f"seq_len ({seq_len}) of input tensor should be smaller than max_seq_len "
                             f"({self.max_seq_len})")
        h = self.tok_embeddings(tokens)
        hidden = []
        for i, layer in enumerate(self.layers):
            if i in self.output_hidden_states:
                hidden.append(h)
            h = layer(h, mask=mask, encoder_input=encoder_input, encoder_mask=encoder_mask, input_pos=input_pos)
        if len(self.layers) in self.output_hidden_states:
            hidden.append(h)
        output = self.unembed(h)
        return [*hidden, output] if hidden else output

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """(b, s, d) -> normed hidden states, or float32 logits (b, s, vocab)."""
        h = self.norm(h)
        if self.skip_output_projection:
            return h
        return self.output(h).float()
