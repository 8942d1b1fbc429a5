"""LoRA adapters (torchtune's ``LoRALinear``): ``y = W x + b + (alpha / rank) * B(A(dropout(x)))``, and DoRA
(torchtune's ``DoRALinear``): ``y = m / ||W + s B A|| * (W x + s B(A(dropout(x)))) + b`` with ``s = alpha / rank``
and the row norm ``||.||`` (one per output feature) taken as a constant in backward, as the DoRA paper does.

State-dict keys: the base ``weight`` (and ``bias``) keep the name of the ``nn.Linear`` they replace, the adapters
add ``lora_a.weight`` (rank, in_dim) and ``lora_b.weight`` (out_dim, rank), and DoRA ``magnitude`` (out_dim,), as
torchtune. ``lora_b`` starts at zero and ``magnitude`` at the row norms of ``W``, so a freshly adapted model computes
exactly what the original did.

Shapes: x (..., in_dim) -> (..., out_dim).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LORA_ATTN_MODULES", "DoRALinear", "LoRALinear", "apply_lora", "apply_lora_to", "disable_adapter",
           "lora_param_names", "merge_lora_state_dict"]

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


def _accumulation_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 weights (in bf16 the small update would round away), float64 for float64."""
    return torch.promote_types(weight.dtype, torch.float32)


def _adapted_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B A`` in the accumulation dtype: (out_dim, in_dim)."""
    dtype = _accumulation_dtype(weight)
    return weight.to(dtype) + scale * (lora_b.to(dtype) @ lora_a.to(dtype))


def _dora_row_norms(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``||W + s B A||`` over each row, (out_dim,), without forming the (out_dim, in_dim) sum:
    ``||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 <B_i, (B A A^T)_i>``, where ``W A^T`` is (out_dim, rank)."""
    dtype = _accumulation_dtype(weight)
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    squares = torch.linalg.vector_norm(weight, dim=1, dtype=dtype).square()
    cross = (b * (weight @ lora_a.to(weight.dtype).T).to(dtype)).sum(1)
    update = (b * (b @ (a @ a.T))).sum(1)
    return (squares + 2 * scale * cross + scale * scale * update).clamp_min(0).sqrt()


class DoRALinear(LoRALinear):
    """DoRA: the adapted weight ``W + s B A`` split into a direction (its rows normalised) and a trainable magnitude
    per output feature. Arguments as ``LoRALinear``.

    The bias is added after the magnitude scaling, as in the DoRA paper and PEFT, so that the merged weights
    (``merge_lora_state_dict``) compute what the adapted layer does; torchtune 0.6.1's ``DoRALinear`` scales the bias
    too in its forward but not in its merge.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_bias: bool = False) -> None:
        super().__init__(in_dim, out_dim, rank, alpha, dropout, use_bias)
        self.magnitude = nn.Parameter(torch.empty(out_dim, device=self.weight.device, dtype=self.weight.dtype))
        if not self.weight.is_meta:
            self.initialize_dora_magnitude()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> DoRALinear:
        dora = super().from_linear(linear, rank, alpha, dropout)
        assert isinstance(dora, DoRALinear)
        weight = linear.weight
        dora.magnitude = nn.Parameter(torch.empty(linear.out_features, device=weight.device, dtype=weight.dtype))
        if not weight.is_meta:
            dora.initialize_dora_magnitude()
        return dora

    @torch.no_grad()
    def initialize_dora_magnitude(self) -> None:
        """Set ``magnitude`` to the row norms of ``W + s B A``, so the layer computes what it did before; call it after
        the base weights are loaded (torchtune's recipes do the same)."""
        if self.weight.is_meta or self.lora_a.weight.is_meta or self.lora_b.weight.is_meta:
            raise RuntimeError("DoRA magnitude: the base or adapter weights are still on the meta device")
        norms = _dora_row_norms(self.weight, self.lora_a.weight, self.lora_b.weight, self.alpha / self.rank)
        self.magnitude.copy_(norms)

    def adapter_params(self) -> list[str]:
        return ["lora_a.weight", "lora_b.weight", "magnitude"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return F.linear(x, self.weight, self.bias)
        scale = self.alpha / self.rank
        with torch.no_grad():
            norms = _dora_row_norms(self.weight, self.lora_a.weight, self.lora_b.weight, scale)
        # the magnitude's gradient flows through this factor; the norms are constants (the paper's section 4.3)
        factor = (self.magnitude.to(norms.dtype) / norms).to(x.dtype)
        out = (F.linear(x, self.weight) + self.lora_b(self.lora_a(self.dropout(x))) * scale) * factor
        return out if self.bias is None else out + self.bias


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
    use_dora: bool = False,
) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``target_modules`` (under the submodule path
    ``scope``, '' = everywhere) by a ``LoRALinear`` (``DoRALinear`` with ``use_dora``) sharing its weights; adapters
    are trainable, the base keeps its ``requires_grad``. Returns the full names of the adapter parameters."""
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
                adapter = _adapter_class(use_dora).from_linear(child, rank, alpha, dropout)
                setattr(parent, child_name, adapter)
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                replaced += [f"{full}.{p}" for p in adapter.adapter_params()]
    return replaced


def _adapter_class(use_dora: bool) -> type[LoRALinear]:
    return DoRALinear if use_dora else LoRALinear


def apply_lora_to(model: nn.Module, names: Iterable[str], *, rank: int = 8, alpha: float = 16,
                  dropout: float = 0.0, use_dora: bool = False) -> list[str]:
    """Replace exactly the ``nn.Linear`` submodules with these full names (e.g. ``decoder.layers.0.attn.q_proj``) by
    ``LoRALinear``s (``DoRALinear``s with ``use_dora``) sharing their weights; adapters are trainable, the base keeps
    its ``requires_grad``. Returns the full names of the adapter parameters. A name that is not an ``nn.Linear`` of
    ``model`` is a ValueError."""
    modules = dict(model.named_modules())
    replaced: list[str] = []
    for full in names:
        child = modules.get(full)
        if type(child) is not nn.Linear:
            raise ValueError(f"LoRA target {full!r} is not an nn.Linear of the model")
        parent_name, _, child_name = full.rpartition(".")
        adapter = _adapter_class(use_dora).from_linear(child, rank, alpha, dropout)
        setattr(modules[parent_name] if parent_name else model, child_name, adapter)
        replaced += [f"{full}.{p}" for p in adapter.adapter_params()]
    return replaced


def _merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
           magnitude: torch.Tensor | None) -> torch.Tensor:
    merged = _adapted_weight(weight, lora_a, lora_b, scale)
    if magnitude is not None:
        merged = merged * (magnitude.to(merged.dtype) / torch.linalg.vector_norm(merged, dim=1)).unsqueeze(1)
    return merged.to(weight.dtype)


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], rank: int | dict[str, int],
                          alpha: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """torchtune's ``get_merged_lora_ckpt``: each ``X.weight`` with adapters ``X.lora_a.weight`` (rank, in) and
    ``X.lora_b.weight`` (out, rank) becomes ``V = X.weight + (alpha / rank) * lora_b @ lora_a``, and with a DoRA
    ``X.magnitude`` (out,) ``V * magnitude / ||V||`` (row norms), computed in float32 and stored in the weight's dtype;
    the adapter keys are dropped: the result loads into the model without LoRA. ``rank`` and
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
        magnitude = state_dict.get(f"{prefix}.magnitude")
        merged[w_key] = _merge(state_dict[w_key], state_dict[key], state_dict[b_key], layer_alpha / layer_rank,
                               magnitude)
        del merged[key], merged[b_key]
        if magnitude is not None:
            del merged[f"{prefix}.magnitude"]
    stray = [k for k in merged if k.endswith((".lora_b.weight", ".magnitude"))]
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
