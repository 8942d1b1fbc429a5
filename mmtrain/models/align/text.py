"""ALIGN's text tower: BERT (token-type embeddings, post-norm layers, tanh pooler) whose self-attention is
``mmtrain.modules.attention.MultiHeadAttention``, so ``attention: {name: local, ...}`` swaps the mechanism.

Shapes:
    input_ids, token_type_ids, position_ids, attention_mask: (B, L)   attention_mask 1 keeps, 0 drops a key
    inputs_embeds: (B, L, H)
    last_hidden_state: (B, L, H)
    pooler_output: (B, H)      tanh(dense(last_hidden_state[:, 0]))
    head_mask: (heads,) or (layers, heads), 1 keeps a head, 0 masks it
    attentions: per layer (B, heads, L, L) softmax probabilities (output_attentions=True)

Attention runs fused (SDPA or the registry mechanism) unless head_mask, output_attentions or a relative
position_embedding_type asks for the probabilities or extra score terms; then an explicit softmax path is used
(dense attention only).

Internal names differ from HF only inside self-attention (``attention.attn.{q,k,v,output}_proj`` and
``attention.norm`` here; ``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}`` there);
the relative-position table is ``attention.distance_embedding`` here, ``attention.self.distance_embedding`` there;
``mmtrain.models.align.checkpoint`` converts at load and save, so files on disk always carry HF's keys.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmtrain.models.align.activations import get_activation
from mmtrain.models.align.configuration import AlignTextConfig
from mmtrain.models.align.outputs import BaseModelOutputWithPoolingAndCrossAttentions
from mmtrain.modules.attention import MultiHeadAttention, ScaledDotProduct
from mmtrain.modules.attention.base import ATTENTION_REGISTRY


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
        self.position_embedding_type = config.position_embedding_type

    def forward(self, input_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_len = inputs_embeds.shape[1]
        if seq_len > self.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")
        if token_type_ids is None:
            # all zeros: row 0 broadcast, without materialising a (B, L) index tensor
            type_embeds = self.token_type_embeddings.weight[0].view(1, 1, -1)
        else:
            type_embeds = self.token_type_embeddings(token_type_ids)
        embeddings = inputs_embeds + type_embeds
        if self.position_embedding_type == "absolute":
            # with relative types positions enter the attention scores instead (the table stays, as in HF BERT)
            if position_ids is None:
                embeddings = embeddings + self.position_embeddings.weight[:seq_len].unsqueeze(0)
            else:
                embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


def _mechanism_name(attention: nn.Module) -> str:
    for name, item in ATTENTION_REGISTRY.items():
        if item.constructor is type(attention):
            return f"{name!r} ({type(attention).__name__})"
    return type(attention).__name__


class AlignTextAttention(nn.Module):
    """Multi-head self-attention + output projection (inside ``attn``), dropout, residual, LayerNorm.

    Two paths give the same result:
      * fused: ``attn`` (SDPA or the registry mechanism); no ``(B, heads, L, L)`` tensor is kept.
      * plain: ``softmax((q k^T [+ relative terms]) / sqrt(d) + mask)``, built explicitly because the
        probabilities are returned (``output_attentions``), scaled per head (``head_mask``) or the scores carry
        relative-position terms (``position_embedding_type`` "relative_key"/"relative_key_query"). Only the dense
        mechanism has this form, so the plain path refuses any other one.
    """

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
        self.position_embedding_type = config.position_embedding_type
        self.max_position_embeddings = config.max_position_embeddings
        if self.position_embedding_type != "absolute":
            self._require_dense(f"position_embedding_type={self.position_embedding_type!r}")
            # one vector per signed distance query - key in [-(P-1), P-1]; HF key: attention.self.distance_embedding
            self.distance_embedding = nn.Embedding(2 * config.max_position_embeddings - 1, self.attn.head_dim)

    def _require_dense(self, why: str) -> None:
        mechanism = self.attn.attention
        if type(mechanism) is not ScaledDotProduct or mechanism.causal:
            raise ValueError(f"{why} needs the explicit softmax attention path, which only the default dense "
                             f"attention has; the text tower uses attention {_mechanism_name(mechanism)}")

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                head_mask: torch.Tensor | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, L, H), key_padding_mask bool (B, L) True keeps, head_mask broadcastable to (B, heads, L, L)
        -> ((B, L, H), probabilities (B, heads, L, L) when ``output_attentions`` else None)."""
        if head_mask is None and not output_attentions and self.position_embedding_type == "absolute":
            return self.norm(x + self.dropout(self.attn(x, **self._fused_mask(x, key_padding_mask)))), None
        if head_mask is not None or output_attentions:
            self._require_dense("head_mask / output_attentions")
        context, probs = self._plain_attention(x, key_padding_mask, head_mask)
        out = self.norm(x + self.dropout(self.attn.output_proj(context)))
        return out, probs if output_attentions else None

    def _fused_mask(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The padding mask as the fused call takes it.

        Dense attention gets an additive (B, 1, 1, L) mask holding finfo.min at padded keys, as HF adds: a boolean
        mask would make SDPA return zeros for a row whose keys are all padded, where HF's softmax is uniform over
        all keys. Other mechanisms take the boolean mask."""
        if key_padding_mask is None:
            return {}
        mechanism = self.attn.attention
        if type(mechanism) is not ScaledDotProduct or mechanism.causal:
            return {"key_padding_mask": key_padding_mask}
        device_type = x.device.type
        # under autocast the scores are in the autocast dtype, whose finfo.min must be used (fp16's float32 min is -inf)
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        bias = torch.zeros(key_padding_mask.shape, dtype=dtype, device=x.device)
        bias = bias.masked_fill(~key_padding_mask, torch.finfo(dtype).min)
        return {"mask": bias[:, None, None, :]}

    def _plain_attention(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                         head_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """HF BertSelfAttention's eager computation: (B, L, H) -> context (B, L, H), probabilities (B, h, L, L)."""
        attn = self.attn
        b, length, _ = x.shape
        q = attn.q_proj(x).view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)
        if self.position_embedding_type != "absolute":
            positions = torch.arange(length, device=x.device)
            distance = positions[:, None] - positions[None, :]  # (L_q, L_k): query position - key position
            rel = self.distance_embedding(distance + self.max_position_embeddings - 1).to(q.dtype)  # (L, L, d)
            scores = scores + torch.einsum("bhld,lrd->bhlr", q, rel)
            if self.position_embedding_type == "relative_key_query":
                scores = scores + torch.einsum("bhrd,lrd->bhlr", k, rel)
        scores = scores / math.sqrt(attn.head_dim)
        if key_padding_mask is not None:
            # HF adds finfo.min (not -inf) at padded keys, so a row with no kept key is uniform, not NaN.
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        # softmax in at least float32 (HF's eager path does so for half precision)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
        dropout = attn.attention.dropout if self.training else 0.0
        probs = torch.nn.functional.dropout(probs, p=dropout, training=self.training)
        if head_mask is not None:
            probs = probs * head_mask
        context = (probs @ v).transpose(1, 2).reshape(b, length, attn.num_heads * attn.head_dim)
        return context, probs


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

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, output_attentions: bool = False):
        """(B, L, H) -> (B, L, H); with ``head_mask`` or ``output_attentions``: ((B, L, H), probs or None)."""
        if head_mask is None and not output_attentions:
            x, _ = self.attention(x, key_padding_mask)
            return self.output(self.intermediate(x), x)
        x, probs = self.attention(x, key_padding_mask, head_mask=head_mask, output_attentions=output_attentions)
        return self.output(self.intermediate(x), x), probs


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
    ) -> BaseModelOutputWithPoolingAndCrossAttentions | tuple:
        """See the module docstring for shapes. ``head_mask``: (heads,) or (layers, heads), 1 keeps a head and 0
        masks it (multiplies its attention probabilities). ``output_attentions``/``output_hidden_states``/
        ``return_dict`` default to the config's values when None."""
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                            inputs_embeds=inputs_embeds)
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != x.shape[:2]:
                raise ValueError(f"attention_mask must be (batch, seq_len) = {tuple(x.shape[:2])}, "
                                 f"got {tuple(attention_mask.shape)}")
            key_padding_mask = attention_mask.bool()
        layer_head_masks = self._per_layer_head_mask(head_mask, x.dtype)
        hidden_states = [x] if output_hidden_states else None
        attentions: list[torch.Tensor] | None = [] if output_attentions else None
        for index, layer in enumerate(self.encoder.layer):
            if layer_head_masks is None and not output_attentions:
                x = layer(x, key_padding_mask)  # fused attention
            else:
                layer_head_mask = layer_head_masks[index] if layer_head_masks is not None else None
                x, probs = layer(x, key_padding_mask, head_mask=layer_head_mask, output_attentions=output_attentions)
                if attentions is not None:
                    attentions.append(probs)
            if hidden_states is not None:
                hidden_states.append(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=x, pooler_output=pooled,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None)
        return out if return_dict else out.to_tuple()

    def _per_layer_head_mask(self, head_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """(heads,) or (layers, heads) -> (layers, 1, heads, 1, 1), broadcast over (B, heads, L, L) per layer."""
        if head_mask is None:
            return None
        layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        if head_mask.ndim == 1 and head_mask.shape[0] == heads:
            head_mask = head_mask.expand(layers, heads)
        if tuple(head_mask.shape) != (layers, heads):
            raise ValueError(f"head_mask must be (num_heads,) = ({heads},) or (num_layers, num_heads) = "
                             f"({layers}, {heads}), got {tuple(head_mask.shape)}")
        return head_mask.to(dtype)[:, None, :, None, None]

    @classmethod
    def from_pretrained(cls, directory, config: AlignTextConfig | None = None, **kwargs) -> AlignTextModel:
        """Load an HF-layout folder holding an ``AlignModel``, ``AlignTextModel`` or plain BERT checkpoint
        (e.g. MiniLM). ``dtype``/``torch_dtype`` as in ``AlignModel.from_pretrained``; other ``kwargs``
        (``attention``, ``add_pooling_layer``) go to the constructor."""
        from mmtrain.models.align.checkpoint import load_pretrained

        return load_pretrained(cls, directory, config=config, **kwargs)

    def save_pretrained(self, directory, safe_serialization: bool = True) -> None:
        from mmtrain.models.align.checkpoint import save_pretrained

        save_pretrained(self, directory, safe_serialization=safe_serialization)
