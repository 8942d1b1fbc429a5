"""LoRA adapters (torchtune's ``LoRALinear``): ``y = W x + b + (alpha / rank) * B(A(dropout(x)))``.

State-dict keys: the base ``weight`` (and ``bias``) keep the name of the ``nn.Linear`` they replace, the adapters
add ``lora_a.weight`` (rank, in_dim) and ``lora_b.weight`` (out_dim, rank), as torchtune. ``lora_b`` starts at
zero, so a freshly adapted model computes exactly what the original did.

Shapes: x (..., in_dim) -> (..., out_dim).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LORA_ATTN_MODULES", "LoRALinear", "apply_lora", "apply_lora_to", "disable_adapter", "lora_param_names",
           "merge_lora_state_dict"]

LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        in_dim, out_dim: linear shapes.
        rank: rank of the update.
        alpha: scaling numerator (the update is multiplied by ``alpha / rank``).
        dropout: dropout on the adapter input.
        use_bias: whether the base layer has a bias.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_bias: bool = False) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_dim, self.out_dim, self.rank, self.alpha = in_dim, out_dim, rank, alpha
        self.use_bias = use_bias
        # torchtune's switch (its disable_adapter context manager sets it): True gives the base layer's output only
        self.disabled = False
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim)) if use_bias else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Adapter around an existing layer's weights (shared, not copied; same device and dtype)."""
        device, dtype = linear.weight.device, linear.weight.dtype
        with torch.device("meta"):
            lora = cls(linear.in_features, linear.out_features, rank, alpha, dropout, linear.bias is not None)
        lora.weight = linear.weight
        if linear.bias is not None:
            lora.bias = linear.bias
        lora.lora_a = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=dtype)
        lora.lora_b = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=dtype)
        if device.type != "meta":
            nn.init.kaiming_uniform_(lora.lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora.lora_b.weight)
        return lora

    def adapter_params(self) -> list[str]:
        return ["lora_a.weight", "lora_b.weight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        return out + self.lora_b(self.lora_a(self.dropout(x))) * (self.alpha / self.rank)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``LoRALinear`` in ``model`` computes its base layer only (torchtune's
    ``disable_adapter``: e.g. the reference model of a preference loss, without a second copy of the weights)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.disabled = was


def apply_lora(
    model: nn.Module,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    *,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    scope: str = "",
) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``target_modules`` (under the submodule path
    ``scope``, '' = everywhere) by a ``LoRALinear`` sharing its weights; adapters are trainable, the base keeps its
    ``requires_grad``. Returns the full names of the adapter parameters."""
    targets = set(target_modules)
    unknown = targets - set(LORA_ATTN_MODULES) - {"w1", "w2", "w3", "output"}
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {list(LORA_ATTN_MODULES)}")
    replaced: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        if scope and not (parent_name == scope or parent_name.startswith(scope + ".")):
            continue
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear.from_linear(child, rank, alpha, dropout))
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                replaced += [f"{full}.lora_a.weight", f"{full}.lora_b.weight"]
    return replaced


def apply_lora_to(model: nn.Module, names: Iterable[str], *, rank: int = 8, alpha: float = 16,
                  dropout: float = 0.0) -> list[str]:
    """Replace exactly the ``nn.Linear`` submodules with these full names (e.g. ``decoder.layers.0.attn.q_proj``) by
    ``LoRALinear``s sharing their weights; adapters are trainable, the base keeps its ``requires_grad``. Returns the
    full names of the adapter parameters. A name that is not an ``nn.Linear`` of ``model`` is a ValueError."""
    modules = dict(model.named_modules())
    replaced: list[str] = []
    for full in names:
        child = modules.get(full)
        if type(child) is not nn.Linear:
            raise ValueError(f"LoRA target {full!r} is not an nn.Linear of the model")
        parent_name, _, child_name = full.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child_name,
                LoRALinear.from_linear(child, rank, alpha, dropout))
        replaced += [f"{full}.lora_a.weight", f"{full}.lora_b.weight"]
    return replaced


def _merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    return (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], rank: int | dict[str, int],
                          alpha: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """torchtune's ``get_merged_lora_ckpt``: each ``X.weight`` with adapters ``X.lora_a.weight`` (rank, in) and
    ``X.lora_b.weight`` (out, rank) becomes ``X.weight + (alpha / rank) * lora_b @ lora_a`` (in float32, stored in the
    weight's dtype) and the adapter keys are dropped: the result loads into the model without LoRA. ``rank`` and
    ``alpha`` may also be dicts from ``X`` to that layer's values. Returns a new dict; the input is not changed."""
    merged = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".lora_a.weight")]:
        prefix = key[: -len(".lora_a.weight")]
        b_key, w_key = f"{prefix}.lora_b.weight", f"{prefix}.weight"
        if b_key not in state_dict or w_key not in state_dict:
            raise ValueError(f"LoRA merge: {key} has no {b_key if b_key not in state_dict else w_key} beside it")
        if isinstance(rank, dict) and prefix not in rank or isinstance(alpha, dict) and prefix not in alpha:
            raise ValueError(f"LoRA merge: no rank/alpha given for {prefix}")
        layer_rank = rank[prefix] if isinstance(rank, dict) else rank
        layer_alpha = alpha[prefix] if isinstance(alpha, dict) else alpha
        merged[w_key] = _merge(state_dict[w_key], state_dict[key], state_dict[b_key], layer_alpha / layer_rank)
        del merged[key], merged[b_key]
    stray = [k for k in merged if k.endswith(".lora_b.weight")]
    if stray:
        raise ValueError(f"LoRA merge: {stray[0]} has no lora_a beside it")
    return merged


def lora_param_names(model: nn.Module) -> list[str]:
    """Full names of every LoRA adapter parameter in ``model``."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            names += [f"{module_name}.{p}" if module_name else p for p in module.adapter_params()]
    return names
