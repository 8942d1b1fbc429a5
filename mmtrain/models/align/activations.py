"""Activation functions by the names HF configs use (``hidden_act``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "selu": nn.SELU,
    "mish": nn.Mish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def get_activation(name: str) -> nn.Module:
    """``hidden_act`` name -> a fresh activation module; unknown names raise ValueError listing the known ones."""
    if callable(name) and not isinstance(name, str):
        return name  # type: ignore[return-value]
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"hidden_act {name!r} is not supported; choose one of {sorted(_ACTIVATIONS)}") from None
