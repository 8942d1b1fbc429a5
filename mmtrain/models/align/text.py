"""ALIGN's text tower: BERT (token-type embeddings, post-norm layers, tanh pooler) whose self-attention is
``mmtrain.modules.attention.MultiHeadAttention``, so ``attention: {name: local, ...}`` swaps the mechanism.

Shapes:
    input_ids, token_type_ids, position_ids, attention_mask: (B, L)   attention_mask 1 keeps, 0 drops a key
    inputs_embeds: (B, L, H)
    last_hidden_state: (B, L, H)
    pooler_output: (B, H)      tanh(dense(last_hidden_state[:, 0]))

Internal names differ from HF only inside self-attention (``attention.attn.{q,k,v,output}_proj`` and
``attention.norm`` here; ``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}`` there);
``mmtrain.models.align.checkpoint`` converts at load and save, so files on disk always carry HF's keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmtrain.models.align.activations import get_activation
from mmtrain.models.align.configuration import AlignTextConfig
from mmtrain.models.align.outputs import BaseModelOutputWithPooling
from mmtrain.modules.attention import MultiHeadAttention


class AlignTextEmbeddings(nn.Module):
    """word + token type + absolute position embeddings, LayerNorm, dropout: (B, L) -> (B, L, H)."""

    def __init__(self, config: AlignTextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.max_position_embeddings = config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_len = inputs_embeds.shape[1]
        if seq_len > self.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")
        if position_ids is None:
            position_embeds = self.position_embeddings.weight[:seq_len].unsqueeze(0)
        else:
            position_embeds = self.position_embeddings(position_ids)
        if token_type_ids is None:
            # all zeros: row 0 broadcast, without materialising a (B, L) index tensor
            type_embeds = self.token_type_embeddings.weight[0].view(1, 1, -1)
        else:
            type_embeds = self.token_type_embeddings(token_type_ids)
        embeddings = inputs_embeds + type_embeds + position_embeds
        return self.dropout(self.LayerNorm(embeddings))


class AlignTextAttention(nn.Module):
    """Multi-head self-attention + output projection (inside ``attn``), dropout, residual, LayerNorm."""

    def __init__(self, config: AlignTextConfig, attention: dict | None = None) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(
            embed_dim=config.hidden_size,
            num_heads=config.num_attention_heads,
            max_seq_len=config.max_position_embeddings,
            attn_dropout=config.attention_probs_dropout_prob,
            attention=dict(attention) if attention is not None else None,
            bias=True,
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.norm(x + self.dropout(self.attn(x, key_padding_mask=key_padding_mask)))


class AlignTextIntermediate(nn.Module):
    def __init__(self, config: AlignTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class AlignTextOutput(nn.Module):
    def __init__(self, config: AlignTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class AlignTextLayer(nn.Module):
    """Post-norm transformer layer: (B, L, H) -> (B, L, H)."""

    def __init__(self, config: AlignTextConfig, attention: dict | None = None) -> None:
        super().__init__()
        self.attention = AlignTextAttention(config, attention)
        self.intermediate = AlignTextIntermediate(config)
        self.output = AlignTextOutput(config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(x, key_padding_mask)
        return self.output(self.intermediate(x), x)


class AlignTextEncoder(nn.Module):
    def __init__(self, config: AlignTextConfig, attention: dict | None = None) -> None:
        super().__init__()
        self.layer = nn.ModuleList([AlignTextLayer(config, attention) for _ in range(config.num_hidden_layers)])


class AlignTextPooler(nn.Module):
    def __init__(self, config: AlignTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class AlignTextModel(nn.Module):
    """BERT encoder of ALIGN. See the module docstring for shapes.

    Args:
        config: ``AlignTextConfig``.
        add_pooling_layer: build the tanh pooler (HF's default True).
        attention: attention-registry config passed to every layer's ``MultiHeadAttention`` (None = dense SDPA).
    """

    def __init__(self, config: AlignTextConfig, add_pooling_layer: bool = True,
                 attention: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.embeddings = AlignTextEmbeddings(config)
        self.encoder = AlignTextEncoder(config, attention)
        self.pooler = AlignTextPooler(config) if add_pooling_layer else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def layer_modules(self) -> list[nn.Module]:
        return list(self.encoder.layer)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        if head_mask is not None or output_attentions:
            # Fused attention kernels never materialise the attention probabilities these options need.
            raise ValueError("head_mask and output_attentions are not supported (attention runs in fused kernels)")
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                            inputs_embeds=inputs_embeds)
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != x.shape[:2]:
                raise ValueError(f"attention_mask must be (batch, seq_len) = {tuple(x.shape[:2])}, "
                                 f"got {tuple(attention_mask.shape)}")
            key_padding_mask = attention_mask.bool()
        hidden_states = [x] if output_hidden_states else None
        for layer in self.encoder.layer:
            x = layer(x, key_padding_mask)
            if hidden_states is not None:
                hidden_states.append(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled,
                                         hidden_states=tuple(hidden_states) if hidden_states is not None else None)
        return out if return_dict is not False else out.to_tuple()

    @classmethod
    def from_pretrained(cls, directory, config: AlignTextConfig | None = None, **kwargs) -> AlignTextModel:
        """Load an HF-layout folder holding an ``AlignModel``, ``AlignTextModel`` or plain BERT checkpoint
        (e.g. MiniLM). ``kwargs`` (``attention``, ``add_pooling_layer``) go to the constructor."""
        from mmtrain.models.align.checkpoint import load_pretrained

        return load_pretrained(cls, directory, config=config, **kwargs)

    def save_pretrained(self, directory, safe_serialization: bool = True) -> None:
        from mmtrain.models.align.checkpoint import save_pretrained

        save_pretrained(self, directory, safe_serialization=safe_serialization)
