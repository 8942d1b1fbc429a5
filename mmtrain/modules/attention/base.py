"""The attention base class and the registry that builds mechanisms from config.

Every mechanism takes per-head tensors whose last two dimensions are (sequence, head_dim):
``q: (*batch, S_q, D)``, ``k: (*batch, S_k, D)``, ``v: (*batch, S_k, D_v)`` -> ``(*batch, S_q, D_v)``.
xFormers documents ``*batch`` as ``batch * heads``; mmtrain's multi-head wrapper passes ``(batch, heads)`` instead so
that fused SDPA kernels see 4-D inputs without a copy. Both work for every mechanism.

Masks follow one convention everywhere: a boolean mask keeps the positions that are True, a float mask is added to
the scores (``-inf`` drops a position). ``att_mask`` broadcasts against ``(*batch, S_q, S_k)``;
``key_padding_mask`` broadcasts against ``(*batch, 1, S_k)`` (or is ``(batch, S_k)``, repeated over heads for 3-D
inputs and viewed as ``(batch, 1, 1, S_k)`` for 4-D ones).

Forward signatures follow xFormers' page: ``forward(q, k, v, att_mask=None, *args, key_padding_mask=None, **kwargs)``,
except ``NystromAttention.forward(q, k, v, key_padding_mask=None, *args, **kwargs)``. Linformer and Favor take no
attention mask: a 4th positional argument raises. A tensor among the extra positionals or under an unknown keyword
raises too (``core.reject_ignored_masks``) where xFormers would silently ignore it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmtrain.errors import ConfigError


class AttentionConfigError(ConfigError, ValueError):
    """An attention config that names an unknown mechanism or gives a mechanism bad arguments.

    It is both a ``ConfigError`` (the CLI prints one line, exit 2) and a ``ValueError`` (what the mechanism
    constructors raise when called directly).
    """


@dataclass
class AttentionConfig:
    """The fields every mechanism understands; mechanisms take extra keyword arguments of their own."""

    name: str
    dropout: float = 0.0


class Attention(nn.Module):
    """Base attention mechanism: the part of multi-head attention after the input projections.

    Subclasses set the capability flags below as class attributes; the multi-head wrapper reads them as xFormers'
    ``MultiHeadDispatch`` does:

    - ``requires_input_projection=False``: q, k and v are the inputs themselves (no projections are built).
    - ``requires_head_dimension``: q, k, v arrive as ``(batch, heads, S, D)``; otherwise the heads are folded into
      the batch, ``(batch * heads, S, D)``, with the attention mask expanded to match.
    - ``requires_same_k_q_dimensions``: queries and keys of different lengths are an error.
    - ``requires_skip_multi_head``: the mechanism gets the wrapper's inputs ``(batch, S, embed_dim)`` and masks as
      given, and its output is returned as is (no projections, no head split).
    - ``supports_attention_mask`` / ``supports_key_padding_mask``: which masks it takes; the wrapper merges a key
      padding mask into the attention mask for mechanisms that take only the latter, and refuses a mask otherwise.

    ``accepts_head_dimension`` (mmtrain's): the mechanism also takes ``(batch, heads, S, D)`` when it does not
    require it, so the wrapper hands heads over without the fold's copy. Every built-in mechanism sets it; a
    mechanism written for xFormers' folded layout leaves it False.
    """

    requires_input_projection: bool = True
    requires_head_dimension: bool = False
    requires_separate_masks: bool = False
    requires_same_k_q_dimensions: bool = False
    requires_skip_multi_head: bool = False
    requires_squared_context: bool = False
    supports_attention_mask: bool = True
    supports_key_padding_mask: bool = False
    accepts_head_dimension: bool = False

    def __init__(self, dropout: float | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.dropout = float(dropout or 0.0)
        self.attn_drop = nn.Dropout(self.dropout, inplace=False)

    @classmethod
    def from_config(cls, config: Any) -> Attention:
        """Build from a config's fields; ``name``/``module`` are dropped, a misspelt argument is an error, and a
        field set to None takes the argument's default (as xFormers, whose config dataclasses default to None).

        The fields the multi-head wrapper fills for every mechanism (``SHARED_ARGUMENTS``) are passed on and a
        mechanism that does not use them ignores them through ``**kwargs``.
        """
        fields = {key: value for key, value in _config_to_dict(config).items() if value is not None}
        fields.pop("name", None)
        fields.pop("module", None)
        accepted = _named_parameters(cls.__init__)
        if accepted:
            # A mechanism taking its own options through **kwargs declares them in its registered config (xFormers'
            # pattern); those fields are arguments too.
            accepted |= _registered_config_fields(cls)
            if dataclasses.is_dataclass(config) and not isinstance(config, type):
                accepted |= {field.name for field in dataclasses.fields(config)}
            unknown = sorted(set(fields) - accepted - SHARED_ARGUMENTS)
            if unknown:
                raise AttentionConfigError(
                    f"{cls.__name__} has no argument {', '.join(map(repr, unknown))} "
                    f"(arguments: {', '.join(sorted(accepted))})"
                )
        return cls(**fields)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


# Filled by the multi-head wrapper for every mechanism; each mechanism takes the ones it needs.
SHARED_ARGUMENTS = frozenset({"dropout", "causal", "num_heads", "dim_head", "dim_model", "seq_len", "to_seq_len"})


def _named_parameters(function: Callable[..., Any]) -> set[str]:
    signature = inspect.signature(function)
    return {
        name
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }


def _registered_config_fields(cls: type) -> set[str]:
    return {
        field.name
        for item in ATTENTION_REGISTRY.values()
        if item.constructor is cls and dataclasses.is_dataclass(item.config)
        for field in dataclasses.fields(item.config)
    }


@dataclass
class _RegistryItem:
    constructor: type
    config: type


ATTENTION_REGISTRY: dict[str, _RegistryItem] = {}


def register_attention(name: str, config: type = AttentionConfig) -> Callable[[type], type]:
    """Class decorator: make ``cls`` buildable as ``build_attention({"name": name, ...})`` and from YAML.

    Registering a name twice is an error, so a user's module cannot silently replace a built-in mechanism.
    """

    def register(cls: type) -> type:
        if name in ATTENTION_REGISTRY and ATTENTION_REGISTRY[name].constructor is not cls:
            raise ValueError(f"attention {name!r} is already registered by {ATTENTION_REGISTRY[name].constructor}")
        if not (isinstance(cls, type) and issubclass(cls, Attention)):
            raise TypeError(f"register_attention({name!r}) expects an Attention subclass, got {cls!r}")
        ATTENTION_REGISTRY[name] = _RegistryItem(cls, config)
        return cls

    return register


def _config_to_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    try:  # omegaconf DictConfig without importing omegaconf here
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            return dict(OmegaConf.to_container(config, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    raise TypeError(f"an attention config is a dict or dataclass with a 'name', got {type(config).__name__}")


def build_attention(config: Any, **defaults: Any) -> Attention:
    """Build a registered mechanism from ``{"name": ..., **kwargs}`` (a dict, DictConfig or dataclass).

    ``defaults`` fill fields the config does not set (the multi-head wrapper passes ``dropout``, ``causal``,
    ``num_heads``, ``dim_head``, ``dim_model`` and ``seq_len`` this way). A ``module`` field names a Python module to
    import first, so a mechanism registered in the user's own code can be chosen from YAML; the config layer checks
    that module against the same allowlist as ``_target_``.

    Raises:
        AttentionConfigError: (a ``ConfigError`` and a ``ValueError``) unknown name, unknown argument or an
            argument the mechanism rejects; the one-line message names the mechanism and the argument.
    """
    fields = _config_to_dict(config)
    name = fields.get("name")
    if not name:
        raise AttentionConfigError(
            "an attention config needs a 'name' (one of: " + ", ".join(sorted(ATTENTION_REGISTRY)) + ")"
        )
    module = fields.get("module")
    if module and name not in ATTENTION_REGISTRY:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise AttentionConfigError(f"attention {name!r}: cannot import module {module!r}: {err}") from err
    if name not in ATTENTION_REGISTRY:
        raise AttentionConfigError(
            f"unknown attention {name!r}; registered: {', '.join(sorted(ATTENTION_REGISTRY))}"
            + ("" if module else " (set 'module' to import one registered in your own code)")
        )
    item = ATTENTION_REGISTRY[name]
    merged = {**{k: v for k, v in defaults.items() if v is not None}, **fields}
    try:
        return item.constructor.from_config(merged)
    except AttentionConfigError:
        raise
    except (TypeError, ValueError) as err:
        message = " ".join(str(err).split())
        raise AttentionConfigError(f"attention {name!r}: {message}") from err
