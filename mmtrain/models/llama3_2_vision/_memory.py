"""Parameter counts and a per-GPU memory estimate for a fusion model, before any weight is allocated.

Works on models built on the meta device. The estimate (bytes per GPU):

- weights: trainable parameters in float32 (the optimizer's master copy); frozen parameters in the compute dtype
  under FSDP on several GPUs (the recipe stores them so: FSDP gathers them in that dtype anyway), else float32
  (autocast casts them per op); divided by the world size under FSDP, replicated under DDP / a single device.
- gradients: float32, trainable parameters only (sharded under FSDP).
- AdamW states: two float32 tensors per trainable parameter (sharded under FSDP).
- FSDP working set: the largest layer all-gathered in the compute dtype, twice (current + prefetched).
- activations (rough): ``~34 * tokens * width`` bytes-per-element per layer kept for backward (Korthikanti et al.,
  flash attention so no score matrices), or one layer's worth plus each layer's input with activation
  checkpointing; decoder tokens = per-GPU batch * seq_len, encoder tokens = per-GPU batch * images * tiles *
  tokens per tile.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["MemoryEstimate", "count_parameters", "estimate_memory", "format_bytes"]

GIB = 1024**3


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; shared parameters counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    fsdp_working_set: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.fsdp_working_set + self.activations

    def describe(self) -> str:
        parts = [f"weights {format_bytes(self.weights)}", f"grads {format_bytes(self.gradients)}",
                 f"AdamW {format_bytes(self.optimizer)}"]
        if self.fsdp_working_set:
            parts.append(f"FSDP all-gather {format_bytes(self.fsdp_working_set)}")
        parts.append(f"activations ~{format_bytes(self.activations)}")
        return f"~{format_bytes(self.total)} per GPU (" + ", ".join(parts) + ")"


def format_bytes(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _layer_width(layer: nn.Module) -> int:
    for name in ("sa_norm", "ca_norm"):
        norm = getattr(layer, name, None)
        shape = getattr(norm, "normalized_shape", None)
        if shape:
            return int(shape[0])
    inner = getattr(layer, "layer", None)
    return _layer_width(inner) if isinstance(inner, nn.Module) else 0


def estimate_memory(
    model: nn.Module,
    *,
    strategy: str = "none",
    world_size: int = 1,
    precision: str = "bf16",
    batch_size: int = 1,
    seq_len: int = 512,
    images_per_sample: int = 1,
    tiles_per_image: int = 4,
    tokens_per_tile: int = 1601,
    activation_checkpointing: bool = False,
) -> MemoryEstimate:
    """Per-GPU memory of training ``model`` (see the module docstring). ``batch_size`` is the global batch."""
    shard = world_size if strategy == "fsdp" else 1
    compute_bytes = 2 if precision in ("bf16", "fp16") else 4
    total, trainable = count_parameters(model)
    frozen = total - trainable
    frozen_bytes = compute_bytes if shard > 1 else 4
    weights = (trainable * 4 + frozen * frozen_bytes) / shard
    gradients = trainable * 4 / shard
    optimizer = trainable * 8 / shard
    layers = model.layer_modules() if callable(getattr(model, "layer_modules", None)) else []
    working = 0.0
    if strategy == "fsdp" and world_size > 1 and layers:
        largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
        working = 2 * largest * compute_bytes
    per_gpu_batch = max(1, batch_size // max(1, world_size))
    decoder_tokens = per_gpu_batch * seq_len
    encoder_tokens = per_gpu_batch * images_per_sample * tiles_per_image * tokens_per_tile
    decoder_layers = set(map(id, getattr(getattr(model, "decoder", None), "layers", [])))
    per_layer = []
    for layer in layers:
        tokens = decoder_tokens if id(layer) in decoder_layers else encoder_tokens
        width = _layer_width(layer)
        fused = 2 if getattr(layer, "fusion_layer", None) is not None else 1
        per_layer.append((tokens * width * compute_bytes, 34 * tokens * width * compute_bytes * fused))
    if activation_checkpointing:
        activations = sum(inp for inp, _ in per_layer) + max((full for _, full in per_layer), default=0)
    else:
        activations = sum(full for _, full in per_layer)
    # Logits (float32) and their gradient for the decoder's output projection.
    vocab = getattr(getattr(getattr(model, "decoder", None), "output", None), "out_features", 0)
    activations += 2 * decoder_tokens * vocab * 4
    return MemoryEstimate(weights, gradients, optimizer, working, float(activations))
