"""Distributed setup on PyTorch's own engine: torchrun environment, process group, DDP / FSDP2 wrapping,
per-layer activation checkpointing, regional or whole-model compile, and the global-batch rule.

Everything here is a no-op in a single process, so a recipe calls the same functions on a laptop and on 8 GPUs:

    dist_info = init_distributed()                       # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    split = split_global_batch(256, dist_info.world_size, micro_batch_size=None)
    apply_activation_checkpointing(model)                # optional, per layer in model.layer_modules()
    compile_model(model, mode="regional")                # optional
    model = wrap_model(model, strategy="fsdp", device=dist_info.device, mixed_precision=True)
    out = dual_encoder_forward(model, pixel_values, input_ids, attention_mask)  # embeds, logit scale, bias
    loss = loss_fn(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
    ...
    destroy()

Shapes: nothing here changes tensor shapes. ``dual_encoder_forward`` takes ``pixel_values (B, 3, H, W)``,
``input_ids (B, L)``, ``attention_mask (B, L)`` and returns embeddings ``(B, D), (B, D)`` with the 0-dim logit
scale and bias.

Fault injection (tests of ``--max-restarts``): with ``MMTRAIN_FAULT_STEP=N`` (and optionally
``MMTRAIN_FAULT_RANK=r``, default 1) in the environment, ``maybe_inject_fault(step)`` kills rank ``r`` at step ``N``
on the first attempt only (torchrun's ``TORCHELASTIC_RESTART_COUNT`` is 0), so the restarted group finishes.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from mmtrain.errors import ConfigError, UserError

__all__ = [
    "BatchSplit",
    "DistInfo",
    "DualEncoderOutput",
    "all_reduce_mean",
    "apply_activation_checkpointing",
    "barrier",
    "broadcast_object",
    "cast_frozen_parameters",
    "compile_model",
    "destroy",
    "dual_encoder_forward",
    "freeze_unused_contrastive_parameters",
    "get_dist_info",
    "grad_sync",
    "init_distributed",
    "maybe_inject_fault",
    "split_global_batch",
    "unwrap_model",
    "wrap_model",
]

STRATEGIES = ("none", "ddp", "fsdp")
# Methods of the dual-encoder interface that the contrastive recipe calls on the wrapped model directly.
_DUAL_ENCODER_METHODS = ("encode_image", "encode_text", "get_logit_scale", "get_logit_bias")
# Those of them that read sharded weights, so FSDP2 must gather the root's parameters around them. The logit
# getters read 0-dim parameters that stay replicated (``_replicate_scalar_parameters``), and FSDP2's root
# pre-forward fails on CUDA for a call without arguments (IndexError in ``_root_pre_forward``, torch 2.11).
_FSDP_FORWARD_METHODS = ("encode_image", "encode_text")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, GPU ``local_rank`` on its node, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from e


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda was requested but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return device


def init_distributed(
    device: str | torch.device | None = "auto",
    backend: str | None = None,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Read the torchrun environment and start the process group (NCCL on CUDA, gloo on CPU).

    A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) starts no process group. Calling it again returns the
    same answer. ``device``: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a ``torch.device``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not (dist.is_available() and dist.is_initialized()):
        _check_launch_environment(world_size, rank)
    dev = _resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        if backend is None:
            backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # eager NCCL init bound to this GPU, no device guessing in collectives
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("MASTER_ADDR"):
            # After a torchrun restart the workers may share the previous attempt's store; keys of the dead
            # attempt (e.g. rank 0's old gloo address) must not be read by the new one, so each attempt gets
            # its own key prefix.
            store, rank, world_size = next(dist.rendezvous("env://", timeout=kwargs["timeout"]))
            kwargs.update(store=dist.PrefixStore(f"mmtrain/attempt_{restart}", store), rank=rank,
                          world_size=world_size)
        dist.init_process_group(**kwargs)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def _check_launch_environment(world_size: int, rank: int) -> None:
    """A stray WORLD_SIZE or RANK (left exported from another job) would otherwise fail deep in the rendezvous."""
    if world_size > 1:
        unset = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if unset:
            raise UserError(f"WORLD_SIZE={world_size} is set but {', '.join(unset)} not: a launcher sets all of "
                            "them; unset WORLD_SIZE for one process, or use mmtrain run --nproc-per-node N")
    if not 0 <= rank < max(world_size, 1):
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world_size}: unset RANK for one process, or use "
                        "mmtrain run --nproc-per-node N")


def get_dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (a new tensor; the input is unchanged). Identity in one process."""
    if not _initialized():
        return tensor.detach().clone()
    out = tensor.detach().clone()
    if out.is_floating_point():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / dist.get_world_size()
    out = out.double()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. an output folder name chosen on rank 0)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    """Tear down the process group if this process started one (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- global batch rule


@dataclass(frozen=True)
class BatchSplit:
    """How a global batch is cut: each of ``world_size`` ranks runs ``accumulation_steps`` micro-batches of
    ``micro_batch_size`` per optimizer step, so ``global = world_size * accumulation_steps * micro_batch_size``."""

    global_batch_size: int
    world_size: int
    per_rank_batch_size: int
    micro_batch_size: int
    accumulation_steps: int


def split_global_batch(
    global_batch_size: int,
    world_size: int,
    micro_batch_size: int | None = None,
    key: str = "batch_size",
) -> BatchSplit:
    """Per-rank batch = global / world; accumulate when a rank cannot hold it (``micro_batch_size`` smaller).

    Raises ``ConfigError`` naming ``key`` when the global batch does not divide evenly, so a run on 3 GPUs never
    silently trains with a different batch than on 1.
    """
    if global_batch_size < 1:
        raise ConfigError(f"{key}: the global batch size must be >= 1, got {global_batch_size}")
    if global_batch_size % world_size != 0:
        raise ConfigError(
            f"{key}: global batch size {global_batch_size} is not divisible by the world size {world_size}"
        )
    per_rank = global_batch_size // world_size
    micro = per_rank if micro_batch_size is None else min(int(micro_batch_size), per_rank)
    if micro < 1 or per_rank % micro != 0:
        raise ConfigError(
            f"{key}: per-rank batch {per_rank} (global {global_batch_size} / world {world_size}) is not a "
            f"multiple of the micro-batch size {micro_batch_size}"
        )
    return BatchSplit(global_batch_size, world_size, per_rank, micro, per_rank // micro)


# ------------------------------------------------------------------------------------------------------ wrapping


def _layer_modules(model: nn.Module, layer_modules: Sequence[nn.Module] | None) -> list[nn.Module]:
    if layer_modules is not None:
        return list(layer_modules)
    getter = getattr(model, "layer_modules", None)
    return list(getter()) if callable(getter) else []


def _fsdp_api() -> tuple[Any, Any, Any]:
    try:  # torch >= 2.6 public location
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:  # pragma: no cover - older torch keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )
    return fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method


def _mixed_precision_dtype(mixed_precision: bool | str | torch.dtype | None,
                           key: str = "distributed.mixed_precision") -> torch.dtype | None:
    """bf16 / fp16 for a low-precision setting; None for fp32 (no cast)."""
    if mixed_precision in (None, False, "none", "no", "fp32", "float32", torch.float32):
        return None
    if mixed_precision in (True, "bf16", "bfloat16", torch.bfloat16):
        return torch.bfloat16
    if mixed_precision in ("fp16", "float16", torch.float16):
        return torch.float16
    raise ConfigError(f"{key}: expected bf16, fp16 or none, got {mixed_precision!r}")


def wrap_model(
    model: nn.Module,
    *,
    strategy: str = "ddp",
    device: torch.device | str | None = None,
    mixed_precision: bool | str | torch.dtype | None = None,
    reshard_after_forward: bool = True,
    layer_modules: Sequence[nn.Module] | None = None,
    find_unused_parameters: bool = True,
    reduce_dtype: str | torch.dtype | None = None,
) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it for data parallelism.

    - ``"none"`` (or any strategy in a single process): the model itself.
    - ``"ddp"``: ``DistributedDataParallel``; gradients all-reduced in fp32 (use autocast for bf16 compute), or in
      ``reduce_dtype`` bf16/fp16 through DDP's compression hook (half the bytes on the wire; each rank's gradient is
      rounded once before the sum).
      ``find_unused_parameters`` defaults to True because some dual encoders hold parameters the contrastive loss
      never reaches (ALIGN's BERT pooler, as in HF); pass False for models that use every parameter (CLIP) to
      skip the per-step graph walk (``freeze_unused_contrastive_parameters`` decides it for the recipe).
    - ``"fsdp"``: FSDP2 ``fully_shard`` on each module of ``layer_modules`` (default ``model.layer_modules()``),
      then on the root. ``mixed_precision`` (``True``/``"bf16"``) gives ``MixedPrecisionPolicy(param_dtype=bf16,
      reduce_dtype=fp32)``; ``reshard_after_forward=False`` keeps layers unsharded between forward and backward
      (more memory, fewer all-gathers). ``reduce_dtype`` (default fp32 with mixed precision) is the dtype of the
      gradient reduce-scatter. ``encode_image`` and ``encode_text`` are registered as FSDP forward methods, so the
      recipe may call them on the wrapped model.

    State-dict keys stay those of the unwrapped model for FSDP2 (it shards in place); DDP adds ``module.``, which
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` removes.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed.strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    grad_dtype = _mixed_precision_dtype(reduce_dtype, key="distributed.reduce_dtype")  # checked in one process too
    if device is not None:
        model = model.to(torch.device(device))
    if strategy == "none" or not _initialized():
        return model
    if strategy == "ddp":
        dev = next(model.parameters()).device
        device_ids = [dev] if dev.type == "cuda" else None
        ddp = _ddp_class()(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
        if grad_dtype is not None:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = default_hooks.bf16_compress_hook if grad_dtype == torch.bfloat16 else default_hooks.fp16_compress_hook
            ddp.register_comm_hook(None, hook)
        return ddp

    fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method = _fsdp_api()
    param_dtype = _mixed_precision_dtype(mixed_precision)
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype,
                                     reduce_dtype=grad_dtype or (torch.float32 if param_dtype else None))
    for layer in _layer_modules(model, layer_modules):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    # fully_shard cannot shard 0-dim parameters (CLIP's logit_scale, ALIGN's temperature): keep them replicated
    # and average their gradients ourselves, so checkpoints keep the peers' shapes.
    scalars = _replicate_scalar_parameters(model)
    # The root holds embeddings, norms, projections and logit scale; it is needed again right after forward.
    fully_shard(model, reshard_after_forward=False, mp_policy=mp_policy, ignored_params=scalars or None)
    for name in _FSDP_FORWARD_METHODS:
        if callable(getattr(type(model), name, None)):
            register_fsdp_forward_method(model, name)
    return model


def freeze_unused_contrastive_parameters(model: nn.Module, setting: bool | str | None = "auto") -> bool:
    """Freeze what a dual encoder declares unused (``unused_contrastive_parameters()``); returns the
    ``find_unused_parameters`` value for DDP.

    ``setting`` "auto" (or None): False when the model declares its unused parameters (they are frozen here, so
    every parameter left trainable gets a gradient each step), else True (an unknown model may leave some
    unreached, and DDP would wait for their gradients forever). True / False: taken as given, nothing frozen.
    Frozen parameters would get no gradient anyway, so AdamW leaves them alone either way: training is unchanged.
    """
    if setting in (True, False):
        return bool(setting)
    if setting not in ("auto", None):
        raise ConfigError(f"distributed.find_unused_parameters: expected auto, true or false, got {setting!r}")
    declare = getattr(model, "unused_contrastive_parameters", None)
    if not callable(declare):
        return True
    for param in declare():
        param.requires_grad_(False)
    return False


def cast_frozen_parameters(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every parameter with ``requires_grad=False`` in ``dtype``; returns how many elements changed dtype.

    Meant for FSDP2 with ``MixedPrecisionPolicy(param_dtype=dtype)``: frozen shards are all-gathered in ``dtype``
    anyway, so keeping them in ``dtype`` changes no computed value and halves their memory (fp32 -> bf16). Trainable
    parameters keep their dtype (the optimizer's master copy). Call it before ``wrap_model``.
    """
    changed = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            changed += param.numel()
    return changed


_DDP_CLASS: type | None = None


def _ddp_class() -> type:
    """``DistributedDataParallel`` that also answers the dual-encoder interface, for evaluation.

    DDP arms its gradient all-reduce only inside ``forward``; a gradient computed through ``encode_image`` would
    never be synchronized. So the interface methods are forwarded to the wrapped model only without autograd
    (``torch.no_grad()``, as in eval); with autograd on they raise and point to ``forward`` /
    ``dual_encoder_forward``.
    """
    global _DDP_CLASS
    if _DDP_CLASS is None:
        from torch.nn.parallel import DistributedDataParallel

        def passthrough(name: str) -> Any:
            def method(self: Any, *args: Any, **kwargs: Any) -> Any:
                target = getattr(self.module, name)
                if name in ("encode_image", "encode_text") and torch.is_grad_enabled() and self.training:
                    raise RuntimeError(
                        f"DDP model.{name}() with autograd would skip the gradient all-reduce; train through "
                        "model(...) or mmtrain.training.distributed.dual_encoder_forward, or wrap eval in "
                        "torch.no_grad()"
                    )
                return target(*args, **kwargs)

            method.__name__ = name
            return method

        namespace = {name: passthrough(name) for name in (*_DUAL_ENCODER_METHODS, "layer_modules")}
        _DDP_CLASS = type("DistributedDataParallel", (DistributedDataParallel,), namespace)
    return _DDP_CLASS


def _is_ddp(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def _average_grad_hook(param: torch.Tensor) -> None:
    if param.grad is not None:
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(dist.get_world_size())


def _replicate_scalar_parameters(model: nn.Module) -> set[nn.Parameter]:
    """0-dim parameters that no FSDP unit manages yet, each given a gradient all-reduce (mean) hook."""
    scalars = {p for p in model.parameters() if p.ndim == 0 and not hasattr(p, "to_local")}
    for param in scalars:
        dist.broadcast(param.data, src=0)  # identical start on every rank, as DDP would ensure
        param.register_post_accumulate_grad_hook(_average_grad_hook)
    return scalars


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP (``.module``) or ``torch.compile`` (``._orig_mod``); FSDP2 shards in place."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif _is_ddp(model):
            model = model.module
        else:
            return model


class DualEncoderOutput(NamedTuple):
    """What one contrastive step needs from a dual encoder (shapes (B, D), (B, D), 0-dim, 0-dim or None)."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


def dual_encoder_forward(
    model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> DualEncoderOutput:
    """Embeddings, logit scale and bias of a (possibly wrapped) dual encoder, for the loss.

    DDP arms its gradient all-reduce only inside ``forward``: calling ``encode_image`` on ``model.module`` would
    skip it and silently train every rank on its own gradients. So under DDP the model's ``forward(
    pixel_values=, input_ids=, attention_mask=)`` is called, which must return ``(image_embeds, text_embeds)`` or an
    object with those attributes (HF ``AlignOutput``). Unwrapped and FSDP2 models are called method by method.
    The logit scale and bias are read outside ``forward``, so a DDP model used here must be wrapped with
    ``find_unused_parameters=False``; models with unused parameters (ALIGN's pooler) put model and loss in one
    module whose ``forward`` returns the loss instead (as the contrastive recipe does).
    """
    if _is_ddp(model):
        inner = model.module
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        if isinstance(out, (tuple, list)) and len(out) == 2:
            image_embeds, text_embeds = out
        elif hasattr(out, "image_embeds") and hasattr(out, "text_embeds"):
            image_embeds, text_embeds = out.image_embeds, out.text_embeds
        else:
            raise TypeError(
                f"{type(inner).__name__}.forward must return (image_embeds, text_embeds) or an object with "
                "those attributes to train under DDP"
            )
    else:
        inner = model
        image_embeds, text_embeds = model.encode_image(pixel_values), model.encode_text(input_ids, attention_mask)
    # The scale and bias parameters' gradient hooks were armed by forward too, so reading them outside is fine.
    return DualEncoderOutput(image_embeds, text_embeds, inner.get_logit_scale(), inner.get_logit_bias())


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for accumulation micro-batches (``enabled=False``)."""
    if enabled:
        yield
        return
    if _is_ddp(model):
        with model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)  # FSDP2
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


# -------------------------------------------------------------------------------- activation checkpointing, compile


def _checkpointed_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, layer_modules: Sequence[nn.Module] | None = None) -> int:
    """Recompute each layer's activations in backward (non-reentrant ``torch.utils.checkpoint``).

    Wraps each layer's ``forward`` in place, so parameter names and state-dict keys do not change. Apply it before
    ``compile_model`` and ``wrap_model``. Returns the number of layers wrapped.
    """
    layers = _layer_modules(model, layer_modules)
    for layer in layers:
        if getattr(layer, "_mmtrain_checkpointed", False):
            continue
        layer.forward = functools.partial(_checkpointed_forward, layer.forward)
        layer._mmtrain_checkpointed = True
    return len(layers)


def compile_model(
    model: nn.Module,
    mode: str = "regional",
    layer_modules: Sequence[nn.Module] | None = None,
    **compile_kwargs: Any,
) -> nn.Module:
    """``torch.compile`` in place (state-dict keys unchanged).

    - ``"regional"``: each repeated layer is compiled once and the compiled code is reused by every layer with the
      same structure (fast compile, no graph breaks at FSDP hooks).
    - ``"whole"``: the dual-encoder methods ``encode_image`` / ``encode_text`` (or ``forward`` for other models)
      are compiled as whole graphs.
    - ``"none"``: nothing.
    """
    if mode in ("none", None, False):
        return model
    if mode == "regional":
        layers = list(_layer_modules(model, layer_modules))
        # Layers of one class share a compiled-code cache; EfficientNet's blocks differ in stride, kernel and
        # resolution from stage to stage, and past the default limit of 8 variants the rest would silently run eager.
        # A layer can need a variant for training and one for eval under no_grad, and one with a dynamic length
        # when sequence lengths vary between batches.
        raise_recompile_limit(3 * len(layers))
        for layer in layers:
            layer.compile(**compile_kwargs)
        return model
    if mode == "whole":
        methods = [m for m in ("encode_image", "encode_text") if callable(getattr(model, m, None))]
        if not methods:
            model.compile(**compile_kwargs)
        for name in methods:
            setattr(model, name, torch.compile(getattr(model, name), **compile_kwargs))
        return model
    raise ConfigError(f"compile: expected regional, whole or none, got {mode!r}")


def raise_recompile_limit(at_least: int) -> None:
    """TorchDynamo's per-function limit on compiled variants, raised to ``at_least`` (past it, calls run eager)."""
    config = torch._dynamo.config
    # The name changed across torch versions; where both exist the old one is an alias of the new.
    for option in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, option):
            setattr(config, option, max(at_least, getattr(config, option)))
            return


# ------------------------------------------------------------------------------------------------ fault injection


def maybe_inject_fault(step: int) -> None:
    """Kill this process at ``MMTRAIN_FAULT_STEP`` on ``MMTRAIN_FAULT_RANK`` (default 1), first attempt only.

    A test hook for ``--max-restarts``: the recipe calls it once per optimizer step. Without the variable it does
    nothing. ``os._exit`` mimics a crashed worker (no cleanup, no exception handling).
    """
    fault_step = os.environ.get("MMTRAIN_FAULT_STEP")
    if not fault_step or int(fault_step) != step:
        return
    if _env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0:
        return
    if _env_int("RANK", 0) != _env_int("MMTRAIN_FAULT_RANK", 1):
        return
    os._exit(_env_int("MMTRAIN_FAULT_EXIT_CODE", 13))
