"""Greedy decoding (or sampling, as torchtune's ``sample``) for decoder and fusion models, with KV caches.

The prompt is processed once ("prefill"); then each step feeds only the newest token: self-attention reads its
KV cache, and cross-attention reads keys/values of the encoder output that were cached at prefill (the encoder
runs once per prompt). ``use_cache=False`` recomputes the whole sequence each step (the reference the cached path
is tested against).

A decoder whose causal self-attention cannot take an attention mask (``model/attention=favor`` or ``nystrom``: they
are causal by themselves but mask nothing else) cannot skip left padding or unfilled cache slots. Such a model
decodes one row at a time, its padding stripped, recomputing the sequence each step with no mask: the same tokens
the masked path would give, slower.

Shapes:
    prompt: long (b, s), left-padded with ``pad_id`` (prompts of different lengths end at the same column)
    encoder_input: dict for ``model.encoder`` (e.g. images (b, i, t, 3, H, W), aspect_ratio (b, i, 2)) or None
    encoder_mask: bool (b, s, s_e) or None; generated tokens reuse the last prompt row (they follow the images)
    -> long (b, s + n): prompt and n <= max_new_tokens generated tokens (``pad_id`` after a row's stop token)

Sampling (``temperature > 0``): logits / temperature, the ``top_k`` largest kept, softmax, then one token per row
drawn as argmax(probs / q) with q ~ Exponential(1) from ``rng`` (torchtune's draw: the same rng gives the same
tokens on a plain decoder). ``temperature=0`` (the default) is greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["causal_mask_from_padding", "generate", "next_token"]


def causal_mask_from_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """(b, s) bool, True = real token -> (b, s, s) bool: causal, never attending to padding.

    Each position also attends to itself, so a padding row is never empty (an empty softmax row gives NaN, and
    NaN values leak into real rows through the zero attention weight: 0 * NaN = NaN).
    """
    s = padding_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=padding_mask.device).tril()
    mask = causal[None] & padding_mask[:, None, :]
    return mask | torch.eye(s, dtype=torch.bool, device=padding_mask.device)[None]


def _self_attention_takes_masks(model: nn.Module) -> bool:
    from mmtrain.modules.attention.multi_head import MultiHeadAttention  # noqa: PLC0415 - keeps this module light

    return all(m.attention.supports_attention_mask for m in model.modules()
               if isinstance(m, MultiHeadAttention) and m.is_causal)


def _row(value: Any, row: int) -> Any:
    """Row ``row`` (kept as a batch of one) of a tensor or of every tensor in a (nested) dict."""
    if isinstance(value, dict):
        return {key: _row(item, row) for key, item in value.items()}
    return value[row : row + 1] if isinstance(value, torch.Tensor) else value


def _generate_row_by_row(model: nn.Module, prompt: torch.Tensor, pad_id: int, encoder_input: dict[str, Any] | None,
                         encoder_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
    rows, paddings = [], []
    for row in range(prompt.shape[0]):
        padding = _left_padding(prompt[row], pad_id)
        paddings.append(padding)
        rows.append(_greedy(
            model, prompt[row : row + 1, padding:], pad_id=pad_id, encoder_input=_row(encoder_input, row),
            encoder_mask=None if encoder_mask is None else encoder_mask[row : row + 1, padding:],
            use_cache=False, masked=False, **kwargs,
        )[0])
    width = max(padding + len(tokens) for padding, tokens in zip(paddings, rows))
    out = torch.full((prompt.shape[0], width), pad_id, dtype=prompt.dtype, device=prompt.device)
    for row, (padding, tokens) in enumerate(zip(paddings, rows)):
        out[row, padding : padding + len(tokens)] = tokens
    return out


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               rng: torch.Generator | None = None) -> torch.Tensor:
    """(b, vocab) logits -> (b,) long: argmax when ``temperature`` is 0, else a draw (see the module docstring)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None:
        pivot = scaled.topk(min(int(top_k), scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < pivot, float("-inf"))
    probs = scaled.softmax(dim=-1)
    q = torch.empty_like(probs).exponential_(1, generator=rng)
    return (probs / q).argmax(dim=-1)


def _left_padding(prompt_row: torch.Tensor, pad_id: int) -> int:
    return int((prompt_row == pad_id).long().cumprod(dim=0).sum())


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    pad_id: int = 0,
    stop_tokens: Sequence[int] | None = None,
    encoder_input: dict[str, Any] | None = None,
    encoder_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    stop_early: bool = True,
    cache_dtype: torch.dtype | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy decoding (argmax each step), or sampling with ``temperature > 0``.

    Args:
        model: ``DeepFusionModel`` or ``TransformerDecoder`` (``forward(tokens, mask=, encoder_input=,
            encoder_mask=, input_pos=)``, ``setup_caches``, ``delete_caches``).
        prompt: left-padded prompt ids (b, s).
        max_new_tokens: most tokens generated.
        pad_id: padding id of the prompt; also written after a row has stopped.
        stop_tokens: ids that end a row (kept in the output).
        encoder_input, encoder_mask: see the module docstring.
        use_cache: KV caches (True) or full recomputation each step (False).
        stop_early: stop once every row has stopped. Turn off under FSDP, where every rank must run the same
            number of forward passes.
        cache_dtype: dtype of the KV caches (default: the parameters' dtype; pass the compute dtype under
            FSDP mixed precision, where parameters stay float32 but keys and values are bf16).
        temperature, top_k, rng: 0 (greedy), or sample as torchtune's ``sample`` (see the module docstring).

    The model's caches are removed on return, so training can continue with the same module.
    """
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be (batch, seq_len), got shape {tuple(prompt.shape)}")
    if int(max_new_tokens) < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    decoder = getattr(model, "decoder", model)
    limit = getattr(decoder, "max_seq_len", None)
    # The last new token is returned, never fed back: the model sees prompt + max_new_tokens - 1 positions.
    if isinstance(limit, int) and prompt.shape[1] + max_new_tokens - 1 > limit:
        raise ValueError(f"a prompt of {prompt.shape[1]} tokens plus max_new_tokens={max_new_tokens} is more than "
                         f"the model's max_seq_len {limit} + 1")
    if temperature < 0 or (top_k is not None and int(top_k) < 1):
        raise ValueError(f"temperature must be >= 0 and top_k >= 1 or None, got {temperature} and {top_k}")
    options = dict(max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, stop_early=stop_early,
                   cache_dtype=cache_dtype, temperature=temperature, top_k=top_k, rng=rng)
    if not _self_attention_takes_masks(model):
        return _generate_row_by_row(model, prompt, pad_id, encoder_input, encoder_mask, **options)
    return _greedy(model, prompt, pad_id=pad_id, encoder_input=encoder_input, encoder_mask=encoder_mask,
                   use_cache=use_cache, masked=True, **options)


def _greedy(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_tokens: Sequence[int] | None,
    encoder_input: dict[str, Any] | None,
    encoder_mask: torch.Tensor | None,
    use_cache: bool,
    stop_early: bool,
    cache_dtype: torch.dtype | None,
    masked: bool,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """``generate``'s loop; ``masked=False``: an unpadded prompt, no attention mask (the model's causal attention
    alone), no cache."""
    b, s = prompt.shape
    device = prompt.device
    total = s + max_new_tokens
    stops = torch.tensor(list(stop_tokens or []), dtype=torch.long, device=device)

    padding = prompt != pad_id
    full_padding = torch.cat([padding, torch.ones(b, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    mask = causal_mask_from_padding(full_padding) if masked else None  # (b, total, total)
    positions = (full_padding.long().cumsum(dim=1) - 1).clamp(min=0)  # left padding shifts positions right
    last_encoder_row = encoder_mask[:, -1:] if encoder_mask is not None else None

    tokens = prompt
    done = torch.zeros(b, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            encoder_len = encoder_mask.shape[-1] if encoder_mask is not None else None
            if encoder_len is None and encoder_input is not None and hasattr(model, "encoder"):
                # no mask to read the length from: the cross-attention cache must hold the whole encoder output
                encoder_len = model.encoder(**encoder_input).shape[1]
            # positions fed to the model: the prompt and every new token but the last
            model.setup_caches(b, cache_dtype or _param_dtype(model), encoder_max_seq_len=encoder_len,
                               decoder_max_seq_len=max(s, total - 1))
            logits = model(prompt, mask=mask[:, :s, :s], encoder_input=encoder_input, encoder_mask=encoder_mask,
                           input_pos=positions[:, :s])
        else:
            logits = model(prompt, mask=None if mask is None else mask[:, :s, :s], encoder_input=encoder_input,
                           encoder_mask=encoder_mask, input_pos=positions[:, :s])
        for step in range(max_new_tokens):
            new = next_token(logits[:, -1], temperature, top_k, rng)
            new = torch.where(done, torch.full_like(new, pad_id), new)
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            if stops.numel():
                done = done | torch.isin(new, stops)
            if step == max_new_tokens - 1 or (stop_early and bool(done.all())):
                break
            cur = s + step  # position of the new token
            if use_cache:
                logits = model(new[:, None], mask=mask[:, cur : cur + 1, : cur + 1], encoder_input=None,
                               encoder_mask=last_encoder_row, input_pos=positions[:, cur : cur + 1])
            else:
                rows = None
                if encoder_mask is not None:
                    rows = torch.cat([encoder_mask, last_encoder_row.expand(-1, cur + 1 - s, -1)], dim=1)
                logits = model(tokens, mask=None if mask is None else mask[:, : cur + 1, : cur + 1],
                               encoder_input=encoder_input, encoder_mask=rows, input_pos=positions[:, : cur + 1])
    finally:
        if use_cache and hasattr(model, "delete_caches"):
            model.delete_caches()
        model.train(was_training)
    return tokens
