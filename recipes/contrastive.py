"""Train or fine-tune a dual encoder (ALIGN, CLIP, SigLIP) with a contrastive loss; eval recall@k and zero-shot.

One optimizer step, as data flows through it (B = per-rank micro-batch, D = embedding width):

    batch: pixel_values (B, 3, H, W), input_ids (B, L), attention_mask (B, L), index (B,), num_skipped ()
    ContrastiveTask: image_embeds (B, D), text_embeds (B, D) = model.encode_image / encode_text (L2-normalized)
                     loss () = loss_fn(image_embeds, text_embeds, model.get_logit_scale(), model.get_logit_bias())
    x gradient_accumulation_steps micro-batches -> clip grad norm -> NaN policy -> optimizer + schedule step
    (accumulation_mode: cached, the default: the micro-batches are embedded once without gradient first, and each
     one's loss covers the whole accumulated batch, as open_clip's --accum-freq; independent: each micro-batch is
     its own contrastive problem)

The global batch is ``batch_size``: each of the world's ranks takes batch_size / world samples per step, in
``gradient_accumulation_steps`` micro-batches; on one GPU the whole step is replayed as a CUDA graph where it can be
(``cuda_graph: auto``, see ``_use_cuda_graph``). Around the loop: eval every ``eval.every_n_steps`` and at the end,
checkpoints every ``checkpoint.every_n_steps`` (resume: auto|none|path), metrics to stdout / metrics.jsonl /
wandb / TensorBoard, and at the end the exported model, metrics.png and a one-line summary.

Run: ``mmtrain run contrastive --config align_tiny`` (or ``python recipes/contrastive.py --config align_tiny``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmtrain.config import check_common_keys, instantiate
from mmtrain.data.loader import build_contrastive_loader
from mmtrain.errors import ConfigError
from mmtrain.modules.attention.multi_head import apply_fused_qkv_setting
from mmtrain.modules.attention.sdpa_backend import SDPA_BACKENDS, sdpa_backend, sdpa_backend_order
from mmtrain.training import distributed as D
from mmtrain.training.checkpoint import (
    CheckpointManager,
    export_model,
    finished_and_exported,
    set_aside_earlier_run,
)
from mmtrain.training.cuda_graph import GraphedStep
from mmtrain.training.metrics import MetricLogger, final_values
from mmtrain.training.nonfinite import NonFiniteGuard
from mmtrain.training.retrieval import caption_ids_from_tokens, gather_eval_outputs, retrieval_metrics
from mmtrain.training.throughput import count_flops, measure_peak_flops, mfu

# cached: every micro-batch's loss covers the whole accumulated batch (open_clip's --accum-freq); independent: each
# micro-batch is its own contrastive problem (cheaper: no extra forward; fewer negatives)
ACCUMULATION_MODES = ("cached", "independent")


class ContrastiveTask(nn.Module):
    """Dual encoder and loss as one module, so DDP/FSDP and the optimizer see the loss's parameters too
    (SigLIP's bias); the checkpoint holds both. ``forward`` returns (loss (), image_embeds (B, D), text_embeds (B, D)).
    """

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cached_images: list[torch.Tensor] | None = None, cached_texts: list[torch.Tensor] | None = None,
                position: int = 0, direct_grad: bool = True):
        """One micro-batch's embeddings and the loss. With ``cached_images``/``cached_texts`` (the accumulated
        batch's embeddings, computed without gradient), this micro-batch's fresh embeddings replace entry
        ``position`` and the loss covers the whole accumulated batch (``accumulation_mode: cached``); the
        temperature and bias then get their gradient only where ``direct_grad``, so that the micro-batches' passes
        add up to the whole batch's gradient once."""
        image_embeds = self.model.encode_image(pixel_values)
        text_embeds = self.model.encode_text(input_ids, attention_mask)
        scale, bias = self.model.get_logit_scale(), self.model.get_logit_bias()
        images, texts = image_embeds, text_embeds
        if cached_images is not None and cached_texts is not None:
            images = torch.cat([*cached_images[:position], image_embeds, *cached_images[position + 1:]])
            texts = torch.cat([*cached_texts[:position], text_embeds, *cached_texts[position + 1:]])
            if not direct_grad:
                scale = scale.detach()
                own_bias = getattr(self.loss, "logit_bias", None)  # SigLipLoss's own, for a model without one
                if bias is not None:
                    bias = bias.detach()
                elif isinstance(own_bias, torch.Tensor):
                    bias = own_bias.detach()
        loss = self.loss(images, texts, scale, bias)
        return loss, image_embeds, text_embeds

    # The dual-encoder interface, so that FSDP registers these as forward methods (eval calls them).
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)

    def get_logit_scale(self) -> torch.Tensor:
        return self.model.get_logit_scale()

    def get_logit_bias(self) -> torch.Tensor | None:
        return self.model.get_logit_bias()

    def clamp_logit_scale_(self) -> None:
        """Keep the temperature parameter in the model's range after an optimizer step (open_clip's clamp)."""
        clamp = getattr(self.model, "clamp_logit_scale_", None)
        if callable(clamp):
            clamp()

    def layer_modules(self) -> list[nn.Module]:
        getter = getattr(self.model, "layer_modules", None)
        return list(getter()) if callable(getter) else []


def is_auto_true_false(setting: Any) -> bool:
    return isinstance(setting, bool) or setting == "auto"  # not `in ("auto", True, False)`: 1 == True


def auto_true_false(cfg: DictConfig, key: str) -> bool | str:
    """A switch that is ``auto``, ``true`` or ``false`` (YAML booleans; 1 and 0 are not accepted)."""
    setting = cfg.get(key, "auto")
    if not is_auto_true_false(setting):
        raise ConfigError(f"{key}: expected auto, true or false, got {setting!r}")
    return setting


class ContrastiveRecipe:
    """setup() -> train() (with evaluate() and save_checkpoint()) -> cleanup(); see the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.step = 0
        self.log_window: tuple[float, int] = (0.0, 0)  # (sum of step losses, steps) since the last log line
        self.skipped_images = 0  # unreadable images this rank's batches skipped, over the whole run
        self.start_time = time.perf_counter()
        self.last_eval: dict[str, float] = {}
        self.last_loss: float | None = None
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        check_run_settings(cfg)
        self.dist = D.init_distributed(device=cfg.get("device", "auto"))
        self.device = self.dist.device
        self.output_dir = Path(str(cfg.output_dir)).expanduser()
        self.max_steps = int(cfg.max_steps)
        precision = str(cfg.get("precision", "auto"))
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("bf16", "fp32"):
            raise ConfigError(f"precision: expected auto, bf16 or fp32, got {precision!r}")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.sdpa = str(cfg.get("sdpa_backend", "auto"))
        sdpa_backend_order(self.sdpa)  # an unknown kernel name is a one-line ConfigError before anything is built
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)  # bit-exact resume on CPU
        cpu_threads = cfg.get("cpu_threads", None)
        if cpu_threads:
            # Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning threads
            # made the CPU demo ~10x slower; `cpu_threads: 1` (align_tiny) avoids both. null: torch's default.
            torch.set_num_threads(int(cpu_threads))

        # Model init must be identical on every rank (FSDP2 does not broadcast it): seed before building.
        torch.manual_seed(int(cfg.seed))
        model = instantiate(cfg.model)
        loss_fn = instantiate(cfg.loss)
        check_bias = getattr(loss_fn, "check_logit_bias", None)
        if callable(check_bias):
            try:  # a loss bias next to the model's would be an unused parameter, which DDP fails on at step 2
                check_bias(model.get_logit_bias())
            except ValueError as error:
                raise ConfigError(f"loss.init_logit_bias: {error}") from None
        self.tokenizer = instantiate(cfg.tokenizer)
        self._check_vocab(model)
        task = ContrastiveTask(model, loss_fn)
        apply_fused_qkv_setting(model, auto_true_false(cfg, "fused_qkv"), self.sdpa)
        self.channels_last = self._use_channels_last(model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # the conv weights; .to(device) later keeps their strides
        if cfg.get("activation_checkpointing", False):
            D.apply_activation_checkpointing(model)
        compile_mode = cfg.get("compile", False)
        if compile_mode:
            # Training batches have one shape (the last is padded), so static graphs: dynamic-shape compiles of
            # EfficientNet's differing blocks took minutes on an H100 and generate slower kernels.
            D.compile_model(model, mode="regional" if compile_mode is True else str(compile_mode), dynamic=False)
        dist_cfg = cfg.get("distributed", {}) or {}
        find_unused = D.freeze_unused_contrastive_parameters(model, dist_cfg.get("find_unused_parameters", "auto"))
        self.task = D.wrap_model(task, strategy=str(dist_cfg.get("strategy", "ddp")), device=self.device,
                                 find_unused_parameters=find_unused,
                                 mixed_precision=dist_cfg.get("mixed_precision", None),
                                 reshard_after_forward=bool(dist_cfg.get("reshard_after_forward", True)),
                                 reduce_dtype=dist_cfg.get("reduce_dtype", None))
        self.inner = D.unwrap_model(self.task)  # the ContrastiveTask (FSDP2 shards in place)
        torch.manual_seed(int(cfg.seed) + self.dist.rank)  # per-rank dropout from here on

        self.split = D.split_global_batch(int(cfg.batch_size), self.dist.world_size, self._micro_batch())
        mode = str(cfg.get("accumulation_mode", "cached"))
        if mode not in ACCUMULATION_MODES:
            raise ConfigError(f"accumulation_mode: expected one of {', '.join(ACCUMULATION_MODES)}, got {mode!r}")
        self.cached_accumulation = mode == "cached" and self.split.accumulation_steps > 1
        self.optimizer = self._build_optimizer()
        self.scheduler = instantiate(cfg.lr_scheduler)(self.optimizer, num_training_steps=self.max_steps)
        self.guard = NonFiniteGuard(**(cfg.get("nonfinite", None) or {}))

        num_workers = int(cfg.get("num_workers", 0))
        normalize_on_device = auto_true_false(cfg, "normalize_on_device")
        if normalize_on_device == "auto":
            normalize_on_device = self.device.type == "cuda"
        decode_on_device = cfg.get("decode_on_device", False)
        if not isinstance(decode_on_device, bool):
            raise ConfigError(f"decode_on_device: expected true or false, got {decode_on_device!r}")
        self.train_set = instantiate(cfg.dataset, split="train")
        self.val_set = instantiate(cfg.dataset, split="validation")
        self.loader = build_contrastive_loader(
            self.train_set, self.tokenizer, batch_size=self.split.micro_batch_size, shuffle=True,
            seed=int(cfg.seed), rank=self.dist.rank, world_size=self.dist.world_size, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", drop_last=True, normalize_on_device=normalize_on_device,
            decode_on_device=self.device if decode_on_device else None)
        # Worker seeds come from the loader's own generator, so making an iterator (as a resumed run does
        # mid-epoch) never draws from the global RNG; augmentations are seeded per sample anyway.
        self.loader.generator = torch.Generator().manual_seed(int(cfg.seed))
        eval_cfg = cfg.get("eval", {}) or {}
        self.val_loader = build_contrastive_loader(
            self.val_set, self.tokenizer, batch_size=int(eval_cfg.get("batch_size", 256)), shuffle=False,
            seed=int(cfg.seed), rank=self.dist.rank, world_size=self.dist.world_size, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", normalize_on_device=normalize_on_device)
        # Its own generator too: a first evaluation in a process (a resumed one evaluates afresh) must not draw
        # the worker seed from the global RNG, which dropout uses.
        self.val_loader.generator = torch.Generator().manual_seed(int(cfg.seed) + 1)

        ckpt_cfg = cfg.get("checkpoint", {}) or {}
        self.checkpoints = CheckpointManager(self.output_dir, keep=ckpt_cfg.get("keep", 2), log_fn=print)
        resume_from = self.checkpoints.resolve_resume(cfg.get("resume", "auto"))
        if resume_from is None:
            set_aside_earlier_run(self.output_dir)
        if resume_from is not None:
            state = self.checkpoints.load(resume_from, self.task, self.optimizer, self.scheduler)
            self.step = int(state["step"])
            self.loader.load_state_dict({"epoch": state.get("data_epoch", 0),
                                         "position": state.get("data_position", 0),
                                         "world_size": state.get("data_world_size", self.dist.world_size)})
            self.guard.load_state_dict(state)
            self.last_checkpoint = resume_from
            # the log window and the unreadable-image counts run across checkpoints, so a resumed run logs what
            # the uninterrupted one does
            self.log_window = (float(state.get("log_window_loss", 0.0)), int(state.get("log_window_steps", 0)))
            self.skipped_images = _share_of(int(state.get("images_skipped", 0)), self.dist.rank, self.dist.world_size)
            self.loader.total_skipped = _share_of(int(state.get("loader_skipped", 0)), self.dist.rank,
                                                  self.dist.world_size)
            self.loader.total_seen = _share_of(int(state.get("loader_seen", 0)), self.dist.rank,
                                               self.dist.world_size)

        log_cfg = cfg.get("log", {}) or {}
        wandb_cfg = log_cfg.get("wandb", False)
        if OmegaConf.is_config(wandb_cfg):
            wandb_cfg = OmegaConf.to_container(wandb_cfg, resolve=True)
        self.logger = MetricLogger(
            self.output_dir, rank=self.dist.rank, total_steps=self.max_steps, wandb=wandb_cfg,
            tensorboard=bool(log_cfg.get("tensorboard", False)), start_step=self.step,
            run_config=OmegaConf.to_container(cfg, resolve=True))
        self.log_every = max(1, int(log_cfg.get("every_n_steps", 10)))
        self.peak_flops = measure_peak_flops(self.device) if self.device.type == "cuda" else None
        self.flops_per_step: int | None = None
        n_params = sum(p.numel() for p in model.parameters())
        self.logger.print(
            f"contrastive: {type(model).__name__} ({n_params / 1e6:.2f}M params), loss {type(loss_fn).__name__}, "
            f"{len(self.train_set)} train / {len(self.val_set)} validation samples, global batch "
            f"{self.split.global_batch_size} = {self.dist.world_size} rank(s) x {self.split.accumulation_steps} x "
            f"{self.split.micro_batch_size}, {self.device}, {precision}, {self.max_steps} steps"
            + (f", resuming at step {self.step}" if self.step else ""))

    def _use_channels_last(self, model: nn.Module) -> bool:
        """``channels_last``: auto (on CUDA for image towers with 2-D batch norm, i.e. convnets such as ALIGN's
        EfficientNet, whose cuDNN depthwise convolutions and batch norms run NHWC-native; ViTs convolve once, in
        the patch embedding, and stay as they are), true, false. Never with FSDP2 sharding, which refuses
        parameters that are not contiguous."""
        setting = auto_true_false(self.cfg, "channels_last")
        sharded = self._fsdp_sharded()
        if setting == "auto":
            return (self.device.type == "cuda" and not sharded
                    and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()))
        if setting and sharded:
            raise ConfigError("channels_last=true: FSDP2 (distributed.strategy=fsdp) takes contiguous parameters "
                              "only; use channels_last=auto or false, or strategy=ddp")
        return setting

    def _fsdp_sharded(self) -> bool:
        """Whether FSDP2 shards the parameters (one process never shards: see ``wrap_model``)."""
        strategy = str(OmegaConf.select(self.cfg, "distributed.strategy") or "ddp")
        return strategy == "fsdp" and self.dist.is_distributed

    def _micro_batch(self) -> int | None:
        accumulation = int(self.cfg.get("gradient_accumulation_steps", 1) or 1)
        if accumulation < 1:
            raise ConfigError(f"gradient_accumulation_steps: must be >= 1, got {accumulation}")
        per_rank = int(self.cfg.batch_size) // self.dist.world_size
        if per_rank % accumulation:
            raise ConfigError(f"gradient_accumulation_steps: per-rank batch {per_rank} is not divisible by "
                              f"{accumulation}")
        return per_rank // accumulation

    def _check_vocab(self, model: nn.Module) -> None:
        tok_size = getattr(self.tokenizer, "vocab_size", None)
        config = getattr(model, "config", None)
        text_config = getattr(config, "text_config", None)
        model_size = getattr(text_config, "vocab_size", None)
        if tok_size is not None and model_size is not None and tok_size > model_size:
            raise ConfigError(f"model.vocab_size: the model's text tower has {model_size} token embeddings but the "
                              f"tokenizer has {tok_size} tokens")

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # No weight decay on biases, norms and scalars (temperature, logit bias), as open_clip and timm do.
        decay, no_decay = [], []
        for param in self.task.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        factory = instantiate(self.cfg.optimizer)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        kwargs = {}
        if self.device.type == "cuda" and self.cfg.optimizer.get("fused", None) is None:
            kwargs["fused"] = True
        return factory([g for g in groups if g["params"]], **kwargs)

    # ------------------------------------------------------------------------------------------------- train
    @contextlib.contextmanager
    def _autocast(self):
        """bf16 autocast (when on) and the SDPA kernel preference, around every forward (and its compilation)."""
        with sdpa_backend(self.sdpa):
            if self.autocast_dtype is None:
                yield
            else:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    yield

    def _batches(self):
        """Endless micro-batches; a new iterator starts the next epoch (the loader advanced its sampler)."""
        while True:
            for batch in self.loader:  # noqa: UP028
                yield batch

    def _timed(self, batches):
        """``batches``, adding the seconds each ``next`` blocks to ``self.data_wait_s``."""
        while True:
            start = time.perf_counter()
            batch = next(batches)
            self.data_wait_s += time.perf_counter() - start
            yield batch

    _HOST_KEYS = ("index", "num_skipped")  # bookkeeping read on the host: copying them over would cost a sync

    def _to_device(self, batch: dict[str, Any], loader=None) -> dict[str, Any]:
        decoder = getattr(loader if loader is not None else self.loader, "device_decoder", None)
        if decoder is not None:  # JPEG bytes -> uint8 pixels on the device (drops files it cannot decode)
            batch = decoder(batch)
        non_blocking = self.device.type == "cuda"
        moved = {k: v.to(self.device, non_blocking=non_blocking) if torch.is_tensor(v) and k not in self._HOST_KEYS
                 else v for k, v in batch.items()}
        normalizer = getattr(loader if loader is not None else self.loader, "pixel_normalizer", None)
        if normalizer is not None and moved.get("pixel_values") is not None:
            moved["pixel_values"] = normalizer(moved["pixel_values"])
        if self.channels_last and moved.get("pixel_values") is not None:
            moved["pixel_values"] = moved["pixel_values"].contiguous(memory_format=torch.channels_last)
        return moved

    def _forward_backward(self, batch: dict[str, Any], scale: float) -> torch.Tensor:
        with self._autocast():
            loss, _, _ = self.task(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        (loss * scale).backward()
        return loss.detach().float()

    def _cached_accumulation(self, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        """open_clip's feature-cached accumulation: the loss of every micro-batch's pass covers the whole
        accumulated batch (its negatives too), at the cost of one more forward without gradient.

        Pass 1 embeds every micro-batch without gradient (BatchNorm statistics restored afterwards, so they move
        once per micro-batch, as in the second pass). Pass j recomputes micro-batch j with gradient in place of its
        cached embeddings; its backward gives the whole loss's gradient through j's embeddings. Summed over j, that
        is the whole batch's gradient. Returns the loss (0-dim, detached float32) of the last pass.
        """
        buffers = [b.detach().clone() for b in self.inner.buffers()]
        with torch.no_grad(), self._autocast():
            cached_images = [self.inner.encode_image(b["pixel_values"]) for b in micro_batches]
            cached_texts = [self.inner.encode_text(b["input_ids"], b["attention_mask"]) for b in micro_batches]
        with torch.no_grad():
            for buffer, saved in zip(self.inner.buffers(), buffers):
                buffer.copy_(saved)
        last = len(micro_batches) - 1
        loss = torch.zeros((), device=self.device)
        for j, batch in enumerate(micro_batches):
            # the temperature's own gradient is taken once, in the pass that syncs gradients across ranks
            with D.grad_sync(self.task, enabled=j == last):
                with self._autocast():
                    loss, _, _ = self.task(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                           cached_images=cached_images, cached_texts=cached_texts, position=j,
                                           direct_grad=j == last)
                loss.backward()
        return loss.detach().float()

    def _device_skip(self) -> bool:
        """Whether a non-finite step is skipped on the device (fused AdamW's ``found_inf``), so the loss and gradient
        norm reach the host only at log, eval and checkpoint steps instead of with a sync after every step.

        ``host_sync``: ``step`` (check each step on the host), ``log`` (device skip; needs an optimizer whose step
        takes ``found_inf``, e.g. ``optimizer.fused=true``), ``auto`` (``log`` on CUDA where the optimizer supports
        it and parameters are not FSDP-sharded, else ``step``).
        """
        mode = str(self.cfg.get("host_sync", "auto"))
        supported = bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))
        if mode == "step":
            return False
        if mode == "log":
            if not supported:
                raise ConfigError(f"host_sync=log: {type(self.optimizer).__name__} cannot skip a step on the device; "
                                  "use a fused optimizer (optimizer.fused=true) or host_sync=step")
            return True
        return supported and self.device.type == "cuda" and not self._fsdp_sharded()

    def _use_cuda_graph(self, device_skip: bool) -> bool:
        """Whether the step is captured and replayed as one CUDA graph (``cuda_graph``: auto, true, false).

        ``auto``: on CUDA where the step has what a graph needs: one process (no DDP/FSDP collectives in it), one
        micro-batch per step, no per-step host sync (``host_sync`` resolving to ``log``), no activation checkpointing
        (its RNG bookkeeping reads generator state on the host), and an optimizer with a ``capturable`` mode; and
        with ``compile`` false or regional, the two that ran graphed on a GPU (``whole`` only with ``true``).
        ``true`` asks for it and names the first condition that is not met.
        """
        mode = auto_true_false(self.cfg, "cuda_graph")
        if mode is False:
            return False
        unmet = None
        if self.device.type != "cuda":
            unmet = "it needs a CUDA device"
        elif self.dist.is_distributed:
            unmet = "it runs in one process only (the DDP/FSDP collectives are not captured)"
        elif self.split.accumulation_steps != 1:
            unmet = "it needs gradient_accumulation_steps: 1"
        elif not device_skip:
            unmet = "it needs the non-finite check on the device (host_sync: log, or auto with a fused optimizer)"
        elif self.cfg.get("activation_checkpointing", False):
            unmet = "activation_checkpointing reads the RNG state on the host, which a capture forbids"
        elif not all("capturable" in group for group in self.optimizer.param_groups):
            unmet = f"{type(self.optimizer).__name__} has no capturable mode"
        if unmet is None:
            compile_mode = self.cfg.get("compile", False)
            return mode is True or isinstance(compile_mode, bool) or str(compile_mode) in ("none", "regional")
        if mode is True:
            raise ConfigError(f"cuda_graph=true: {unmet}; use cuda_graph=auto or false")
        return False

    def _device_step(self, params: list[torch.Tensor], max_norm: float) -> Any:
        """The whole optimizer step on the device, with no host sync: ``(inputs) -> (loss (), grad_norm ())``.

        Only with ``device_skip`` and one micro-batch: a non-finite loss or gradient leaves the weights untouched
        through fused AdamW's ``found_inf``.
        """
        def step(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._forward_backward(inputs, 1.0)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            self._step_unless_nonfinite(loss, grad_norm)
            return loss, grad_norm.detach()

        return step

    def _step_unless_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Optimizer step decided on the device: fused AdamW leaves weights, moments and its step count untouched
        where ``found_inf`` is 1 (a non-finite loss or gradient norm)."""
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self.optimizer.grad_scale = None
        self.optimizer.found_inf = (~finite).to(torch.float32)
        self.optimizer.step()
        self.inner.clamp_logit_scale_()

    def train(self) -> None:
        cfg = self.cfg
        eval_every = (cfg.get("eval", {}) or {}).get("every_n_steps", None)
        ckpt_every = (cfg.get("checkpoint", {}) or {}).get("every_n_steps", None)
        clip = cfg.get("clip_grad_norm", None)
        max_norm = float(clip) if clip else float("inf")  # no clipping: the norm is still measured and logged
        accumulation = self.split.accumulation_steps
        params = [p for p in self.task.parameters() if p.requires_grad]
        self.data_wait_s = 0.0
        batches = self._timed(self._batches())
        device_skip = self._device_skip()
        window_loss, window_steps = self.log_window
        window_samples, window_start = 0, time.perf_counter()
        grad_norm_value = float("nan")
        # (step, loss, grad norm) of steps whose values are still on the device (device_skip only)
        pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def settle(step: int, loss_value: float, grad_value: float) -> bool:
            """Apply the non-finite policy to a step's host values (may raise); True when the step counts."""
            nonlocal window_loss, window_steps, grad_norm_value
            grad_norm_value = grad_value
            if self.guard.check(step, loss_value, grad_value):
                window_loss += loss_value
                window_steps += 1
                self.last_loss = loss_value
                return True
            self.logger.print(f"step {step}: non-finite loss {loss_value} / grad norm {grad_value}; "
                              f"step skipped ({self.guard.skipped} so far, policy {self.guard.policy})")
            return False

        if self.step >= self.max_steps:
            self.logger.print(f"step {self.step} >= max_steps {self.max_steps}: nothing left to train "
                              "(resume=none starts over)")
        graphed = None
        if self._use_cuda_graph(device_skip):
            graphed = GraphedStep(self._device_step(params, max_norm), self.optimizer)
            self.logger.print("cuda_graph: the step is captured after 3 eager steps and replayed as one CUDA graph")
        while self.step < self.max_steps:
            step = self.step + 1
            if graphed is not None:
                batch = self._to_device(next(batches))
                self.skipped_images += int(batch["num_skipped"])
                window_samples += int(batch["index"].numel())
                inputs = {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}
                if self.flops_per_step is None and self.peak_flops is not None:
                    flops, outputs = count_flops(lambda: graphed(inputs))  # noqa: B023 - an eager warm-up step
                    self.flops_per_step = flops
                else:
                    outputs = graphed(inputs)
                # the graph's static outputs are overwritten by the next replay: keep copies until they are read
                pending.append((step, outputs[0].clone(), outputs[1].clone()))
            else:
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=self.device)
                if self.cached_accumulation:
                    micro_batches = [self._to_device(next(batches)) for _ in range(accumulation)]
                    for batch in micro_batches:
                        self.skipped_images += int(batch["num_skipped"])
                        window_samples += int(batch["index"].numel())
                    if self.flops_per_step is None and self.peak_flops is not None:
                        self.flops_per_step, loss = count_flops(lambda: self._cached_accumulation(micro_batches))  # noqa: B023
                    else:
                        loss = self._cached_accumulation(micro_batches)
                    loss_sum = loss * accumulation  # the whole batch's loss (divided by accumulation below)
                else:
                    for micro in range(accumulation):
                        batch = self._to_device(next(batches))
                        self.skipped_images += int(batch["num_skipped"])
                        window_samples += int(batch["index"].numel())
                        with D.grad_sync(self.task, enabled=micro == accumulation - 1):
                            if self.flops_per_step is None and self.peak_flops is not None:
                                flops, loss = count_flops(lambda: self._forward_backward(batch, 1.0 / accumulation))  # noqa: B023
                                self.flops_per_step = flops * accumulation
                            else:
                                loss = self._forward_backward(batch, 1.0 / accumulation)
                        loss_sum += loss
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                step_loss = D.all_reduce_mean(loss_sum / accumulation)
                if device_skip:
                    self._step_unless_nonfinite(step_loss, grad_norm)
                    pending.append((step, step_loss, grad_norm.detach()))
                elif settle(step, step_loss.item(), float(grad_norm)):
                    self.optimizer.step()
                    self.inner.clamp_logit_scale_()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.step = step
            D.maybe_inject_fault(step)

            log_now = step % self.log_every == 0 or step == self.max_steps
            eval_now = bool(eval_every) and step % int(eval_every) == 0 and step != self.max_steps
            ckpt_now = bool(ckpt_every) and (step % int(ckpt_every) == 0 or step == self.max_steps)
            if pending and (log_now or eval_now or ckpt_now):
                values = torch.stack([torch.stack([lo.float(), gn.float()]) for _, lo, gn in pending]).tolist()  # 1 sync
                for (pending_step, _, _), (loss_value, grad_value) in zip(pending, values):
                    settle(pending_step, loss_value, grad_value)
                pending.clear()
            if log_now:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                seconds_per_step = elapsed / max(1, window_steps or self.log_every)
                metrics = {
                    "loss": window_loss / window_steps if window_steps else float("nan"),
                    "lr": lr,
                    "samples_per_s": window_samples * self.dist.world_size / elapsed,
                    # share of the window the loop sat waiting for the loader: near 0 the step is the limit,
                    # near 1 the data path is (more num_workers, decode_on_device)
                    "data_wait": min(self.data_wait_s / elapsed, 1.0),
                    "grad_norm": grad_norm_value,
                    "skipped_images": D.all_reduce_mean(
                        torch.tensor(float(self.skipped_images), device=self.device)).item() * self.dist.world_size,
                    "nonfinite_steps": self.guard.skipped,
                }
                if self.device.type == "cuda":
                    metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    metrics["mfu"] = mfu(self.flops_per_step, seconds_per_step, self.peak_flops)
                self.logger.log(step, metrics)
                window_loss, window_steps, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
                self.data_wait_s = 0.0
            known = not pending and self.last_loss is not None
            self.logger.advance(1, **({"loss": self.last_loss} if known else {}))
            if eval_now:
                self.evaluate()
            # No checkpoint of a non-finite step (nonfinite.py's promise): the last good one stays the newest.
            if ckpt_now and not self.guard.consecutive:
                self.log_window = (window_loss, window_steps)
                self.save_checkpoint()
        if graphed is not None:
            # a replay count far below the step count means batches of other shapes ran eagerly (slower)
            self.logger.print(f"cuda_graph: {graphed.replays} steps replayed, {graphed.eager_steps} eager")

    # ------------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.task.eval()
        images, texts, captions, indices = [], [], [], []
        for batch in self.val_loader:
            caption_ids = caption_ids_from_tokens(batch["input_ids"], batch["attention_mask"])
            batch = self._to_device(batch, self.val_loader)
            with self._autocast():
                images.append(self.task.encode_image(batch["pixel_values"]).float().cpu())
                texts.append(self.task.encode_text(batch["input_ids"], batch["attention_mask"]).float().cpu())
            captions.append(caption_ids)
            indices.append(batch["index"].cpu())
        self.task.train()
        image_embeds, text_embeds, caption_ids = gather_eval_outputs(
            torch.cat(images), torch.cat(texts), torch.cat(captions), torch.cat(indices))
        metrics = {f"val/{k}": v for k, v in retrieval_metrics(image_embeds, text_embeds, caption_ids).items()}
        self.last_eval = metrics
        self.logger.log(self.step, metrics, prefix="eval")
        return metrics

    # ------------------------------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self) -> Path | None:
        data = self.loader.state_dict()
        counts = D.all_reduce_mean(torch.tensor(
            [float(self.skipped_images), float(self.loader.total_skipped), float(self.loader.total_seen)],
            dtype=torch.float64, device=self.device)) * self.dist.world_size
        skipped, loader_skipped, loader_seen = (int(round(c)) for c in counts.tolist())
        state = {"data_epoch": data["epoch"], "data_position": data["position"],
                 "data_world_size": data.get("world_size", self.dist.world_size), **self.guard.state_dict(),
                 "log_window_loss": float(self.log_window[0]), "log_window_steps": int(self.log_window[1]),
                 "images_skipped": skipped, "loader_skipped": loader_skipped, "loader_seen": loader_seen}
        path = self.checkpoints.save(self.step, self.task, self.optimizer, self.scheduler, state)
        if path is not None:
            self.last_checkpoint = path
        return path

    def export(self) -> Path:
        return export_model(self.inner.model, self.output_dir / "model", self.cfg, step=self.step)

    def cleanup(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close(plot=False)
        D.destroy()

    # ------------------------------------------------------------------------------------------------- run
    def already_complete(self) -> dict[str, Any] | None:
        """The summary of this output_dir's finished run when it was resumed with nothing left to do (trained to
        max_steps, evaluated and exported at that step), so a rerun does not evaluate and export it again."""
        if not finished_and_exported(self.output_dir / "model", self.step, self.max_steps):
            return None
        final_loss, final_eval = final_values(self.logger.jsonl_path, self.step)
        self.logger.print(f"already complete: trained to step {self.step} (max_steps {self.max_steps}), evaluated "
                          f"and exported to {self.output_dir / 'model'}; resume=none starts over, a larger "
                          "max_steps trains on")
        return {"steps": self.step, "time_s": round(time.perf_counter() - self.start_time, 2),
                "final_loss": final_loss, **final_eval,
                "nonfinite_steps": self.guard.skipped, "skipped_images": 0, "output_dir": str(self.output_dir),
                "export_dir": str(self.output_dir / "model"), "metrics_jsonl": str(self.logger.jsonl_path),
                "metrics_png": str(self.logger.png_path) if self.logger.png_path.exists() else None,
                "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "already_complete": True}

    def run(self) -> dict[str, Any]:
        self.setup()
        done = self.already_complete()
        if done is not None:
            return done
        self.train()
        final_eval = self.evaluate()
        export_dir = self.export()
        png = self.logger.close(plot=True)
        elapsed = time.perf_counter() - self.start_time
        summary = {
            "steps": self.step,
            "time_s": round(elapsed, 2),
            "final_loss": self.last_loss,
            **final_eval,
            "nonfinite_steps": self.guard.skipped,
            "skipped_images": getattr(self.loader, "total_skipped", 0),
            "output_dir": str(self.output_dir),
            "export_dir": str(export_dir),
            "metrics_jsonl": str(self.logger.jsonl_path),
            "metrics_png": str(png) if png else None,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
        }
        loss_text = f"{self.last_loss:.4f}" if self.last_loss is not None and math.isfinite(self.last_loss) else "n/a"
        evals = " ".join(f"{k} {v:.3f}" for k, v in final_eval.items() if k != "val/num_classes")
        self.logger.print(
            f"done: {self.step} steps in {elapsed:.1f}s | final loss {loss_text} | {evals} | wrote {self.output_dir}: "
            f"model/ (exported weights + config), metrics.jsonl, metrics.png, checkpoints/")
        return summary


def _share_of(total: int, rank: int, world_size: int) -> int:
    """Rank ``rank``'s part of a count summed over ``world_size`` ranks (the parts add up to ``total``)."""
    return total // world_size + (1 if rank < total % world_size else 0)


def check_run_settings(cfg: DictConfig) -> None:
    """One-line ConfigErrors, before anything is built, for run settings that would otherwise fail deep inside
    (a scheduler complaining about ``num_training_steps``, torch about a device string, mkdir about a file)."""
    for key, optional in (("max_steps", False), ("checkpoint.every_n_steps", True), ("eval.every_n_steps", True)):
        value = OmegaConf.select(cfg, key)
        if value is None and optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if optional else 1):
            what = "a positive integer (or 0 / null: never)" if optional else "a positive integer"
            raise ConfigError(f"{key}: must be {what}, got {value!r}")
    device = str(cfg.get("device", "auto"))
    if device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"device: {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    output_dir = Path(str(cfg.output_dir)).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir: {output_dir} exists and is not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir: cannot create {output_dir} ({e.strerror or e})") from None


def main(cfg: DictConfig) -> dict[str, Any]:
    """Run the recipe on ``cfg``; returns the summary (steps, time, final loss, final eval metrics, paths)."""
    recipe = ContrastiveRecipe(cfg)
    try:
        return recipe.run()
    finally:
        recipe.cleanup()


def validate(cfg: DictConfig, report) -> None:
    """Recipe-specific checks for ``mmtrain validate`` (each problem names its key)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    check_common_keys(cfg, report, components=("model", "loss", "optimizer", "lr_scheduler", "dataset", "tokenizer"),
                      required=("seed", "batch_size", "max_steps", "output_dir"))

    def positive_int(key: str, allow_none: bool = False) -> None:
        value = OmegaConf.select(cfg, key)
        if value is None and allow_none:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            report.error(key, f"must be a positive integer, got {value!r}")

    positive_int("max_steps")
    positive_int("batch_size")
    positive_int("gradient_accumulation_steps", allow_none=True)
    mode = cfg.get("accumulation_mode", "cached")
    if mode not in ACCUMULATION_MODES:
        report.error("accumulation_mode", f"expected one of {', '.join(ACCUMULATION_MODES)}, got {mode!r}")
    for key in ("eval.every_n_steps", "checkpoint.every_n_steps"):  # 0 / null: never (check_run_settings agrees)
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            report.error(key, f"must be a positive integer (or 0 / null: never), got {value!r}")
    positive_int("log.every_n_steps", allow_none=True)
    positive_int("cpu_threads", allow_none=True)
    batch, accumulation = cfg.get("batch_size"), cfg.get("gradient_accumulation_steps", 1) or 1
    if isinstance(batch, int) and isinstance(accumulation, int) and accumulation > 0:
        if batch % world or (batch // world) % accumulation:
            report.error("batch_size", f"global batch {batch} must split into {world} rank(s) x {accumulation} "
                         "accumulation steps")
    policy = OmegaConf.select(cfg, "nonfinite.policy")
    if policy not in (None, "stop", "skip"):
        report.error("nonfinite.policy", f"must be stop or skip, got {policy!r}")
    if str(cfg.get("precision", "auto")) not in ("auto", "bf16", "fp32"):
        report.error("precision", f"must be auto, bf16 or fp32, got {cfg.get('precision')!r}")
    if str(cfg.get("sdpa_backend", "auto")) not in ("auto", *SDPA_BACKENDS):
        report.error("sdpa_backend", f"must be auto or one of {', '.join(SDPA_BACKENDS)}, got {cfg.get('sdpa_backend')!r}")
    if str(cfg.get("host_sync", "auto")) not in ("auto", "step", "log"):
        report.error("host_sync", f"must be auto, step or log, got {cfg.get('host_sync')!r}")
    for key in ("cuda_graph", "channels_last", "normalize_on_device", "fused_qkv"):
        if not is_auto_true_false(cfg.get(key, "auto")):
            report.error(key, f"must be auto, true or false, got {cfg.get(key)!r}")
    if cfg.get("decode_on_device", False) not in (True, False):
        report.error("decode_on_device", f"must be true or false, got {cfg.get('decode_on_device')!r}")
    strategy = OmegaConf.select(cfg, "distributed.strategy")
    if strategy not in (None, "none", "ddp", "fsdp"):
        report.error("distributed.strategy", f"must be none, ddp or fsdp, got {strategy!r}")


if __name__ == "__main__":
    from mmtrain.config import recipe_entry

    recipe_entry(main)
