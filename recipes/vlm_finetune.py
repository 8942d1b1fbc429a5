"""Fine-tune a Llama 3.2 Vision-style fusion model (decoder cross-attending to a tiled image encoder) on VQA.

One step: a batch of interleaved image + text samples (``tokens`` (b, s), ``labels`` (b, s) with -100 outside the
answers, ``encoder_input.images`` (b, i, t, 3, H, W), ``encoder_mask`` (b, s, i*t*e)) -> logits (b, s, vocab) ->
next-token cross-entropy on answer tokens only. Evaluation decodes greedy answers for the validation split
(KV caches, encoder run once per prompt) and logs ``val/answer_acc`` (exact match) to metrics.jsonl.

Config keys: output_dir, seed, max_steps, resume, pretrained (weights to start from: a Hugging Face
Llama-3.2-Vision folder, Meta's consolidated.pth or its folder, an export of this recipe or a .safetensors file
with torchtune's keys; not read when resuming), batch_size, precision (fp32|bf16), sdpa_backend (auto|cudnn|flash|efficient|math|fa4), fused_qkv
(auto|true|false: one q/k/v projection matmul; auto: with fa4),
compile (none|regional|whole), activation_checkpointing, distributed.{strategy,world_size,reduce_dtype},
checkpoint.{every_n_steps (0: no checkpoint; else also the last step),keep},
eval.{every_n_steps,batch_size,max_new_tokens,max_samples}, log.{every_n_steps,wandb,progress_bar},
nonfinite.{policy,max_consecutive} (a NaN/inf loss or gradient norm: skip the step, or stop after that many in a
row), tokenizer, dataset, model, optimizer, lr_scheduler.

With ``export`` (default true) the consolidated weights are written to ``output_dir/model/`` at the end
(``model.safetensors`` with torchtune's key names, and the run's ``config.yaml``), as the contrastive recipe does.
A LoRA model's export is torchtune's: the adapters merged into ``model.safetensors`` (it loads into the model without
LoRA) and alone in ``adapter_model.safetensors`` + ``adapter_config.json``; ``save_adapter_weights_only`` writes only
the adapters.
On a GPU the model is built on the device. Under FSDP2 with bf16 on several GPUs, frozen weights are stored in bf16.
The log's step_s, samples_per_s and peak_mem_gib cover the training steps since the previous log line.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from mmtrain.config import check_common_keys, instantiate
from mmtrain.errors import ConfigError
from mmtrain.modules.attention.multi_head import apply_fused_qkv_setting
from mmtrain.modules.attention.sdpa_backend import SDPA_BACKENDS, sdpa_backend, sdpa_backend_order
from mmtrain.training.nonfinite import POLICIES, NonFiniteGuard

IGNORE = -100


def _world_size_for(cfg: DictConfig) -> int:
    ws = OmegaConf.select(cfg, "distributed.world_size")
    if ws:
        return int(ws)
    return int(os.environ.get("WORLD_SIZE", OmegaConf.select(cfg, "distributed.nproc_per_node") or 1))


def validate(cfg: DictConfig, report: Any) -> None:
    """Config checks (``mmtrain run`` runs them too, before starting) and, for ``mmtrain validate``, the parameter
    counts and the estimated memory per GPU for the configured sharding and precision."""
    from mmtrain.models.llama3_2_vision._memory import count_parameters, estimate_memory

    check_common_keys(cfg, report, components=("model", "optimizer", "dataset", "tokenizer"),
                      optional_components=("lr_scheduler",), required=("batch_size", "max_steps", "output_dir"))
    if "model" not in cfg:  # reported above
        return
    strategy = str(OmegaConf.select(cfg, "distributed.strategy") or "none")
    world = _world_size_for(cfg)
    precision = str(cfg.get("precision", "fp32"))
    if strategy not in ("none", "ddp", "fsdp"):
        report.error("distributed.strategy", f"expected none, ddp or fsdp, got {strategy!r}")
    if precision not in ("fp32", "bf16"):
        report.error("precision", f"expected fp32 or bf16, got {precision!r}")
    if str(cfg.get("sdpa_backend", "auto")) not in ("auto", *SDPA_BACKENDS):
        report.error("sdpa_backend", f"must be auto or one of {', '.join(SDPA_BACKENDS)}, got {cfg.get('sdpa_backend')!r}")
    if cfg.get("fused_qkv", "auto") not in ("auto", True, False):
        report.error("fused_qkv", f"must be auto, true or false, got {cfg.get('fused_qkv')!r}")
    for key in ("export", "save_adapter_weights_only"):
        if not isinstance(cfg.get(key, False), bool):
            report.error(key, f"must be true or false, got {cfg.get(key)!r}")
    policy = OmegaConf.select(cfg, "nonfinite.policy")
    if policy is not None and policy not in POLICIES:
        report.error("nonfinite.policy", f"must be {' or '.join(POLICIES)}, got {policy!r}")
    batch = int(cfg.get("batch_size", 1))
    # `mmtrain validate` plans for the configured world size; before a run, the ranks it will really have (one
    # process without a launcher: distributed.world_size describes the planned job, and each rank checks again)
    ranks = world if report.collects_infos else int(os.environ.get("WORLD_SIZE", 1))
    if batch % ranks:
        report.error("batch_size", f"global batch {batch} is not divisible by the world size {ranks}")
    try:
        check_tiling(cfg)
    except ConfigError as e:
        key, _, cause = str(e).partition(": ")
        report.error(key, cause)
    if not report.collects_infos or strategy not in ("none", "ddp", "fsdp"):
        return  # building the model on the meta device is for the notes below: `run` builds it for real
    try:
        with torch.device("meta"):
            model = instantiate(cfg.model)
    except Exception:  # the generic validation already reported why the model does not build
        return
    total, trainable = count_parameters(model)
    report.info(f"model: {total:,} parameters ({total / 1e9:.2f}B), {trainable:,} trainable "
                f"({100 * trainable / max(total, 1):.1f}%)")
    patch = int(OmegaConf.select(cfg, "model.patch_size") or 14)
    tile = int(OmegaConf.select(cfg, "model.image_size") or 560)
    tiles = int(OmegaConf.select(cfg, "memory.tiles_per_image") or OmegaConf.select(cfg, "model.max_num_tiles") or 1)
    estimate = estimate_memory(
        model, strategy=strategy, world_size=world, precision=precision, batch_size=batch,
        seq_len=int(OmegaConf.select(cfg, "memory.seq_len") or OmegaConf.select(cfg, "tokenizer.max_seq_len") or 512),
        tiles_per_image=tiles, tokens_per_tile=(tile // patch) ** 2 + 1,
        activation_checkpointing=bool(cfg.get("activation_checkpointing", False)))
    report.info(f"memory ({strategy}, {world} GPU{'s' if world > 1 else ''}, {precision}, global batch {batch}): "
                f"{estimate.describe()}")


def check_tiling(cfg: DictConfig) -> None:
    """The image tiling must divide evenly and agree between model and dataset (otherwise the encoder's patch
    count and the cross-attention masks disagree deep inside attention): one-line ConfigError naming the key."""
    patch = OmegaConf.select(cfg, "model.patch_size")
    tile = OmegaConf.select(cfg, "model.image_size")
    if isinstance(patch, int) and isinstance(tile, int) and patch > 0 and tile % patch:
        raise ConfigError(f"model.patch_size: {patch} does not divide model.image_size (the tile size) {tile}")
    for model_key, data_keys in (("model.patch_size", ("dataset.patch_size",)),
                                 ("model.image_size", ("dataset.image_size", "dataset.tile_size"))):
        model_value = OmegaConf.select(cfg, model_key)
        for data_key in data_keys:
            data_value = OmegaConf.select(cfg, data_key)
            if model_value is not None and data_value is not None and data_value != model_value:
                raise ConfigError(f"{data_key}: {data_value} differs from {model_key} {model_value}; the dataset "
                                  "must tile images the way the model's encoder does")


# ------------------------------------------------------------------------------------------------------ helpers
def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = _to_device(value, device)
        elif isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out


def _batch_indices(step: int, batch_size: int, num_samples: int, seed: int) -> list[int]:
    """Global sample indices of optimizer step ``step`` (0-based): a fresh permutation each epoch, a function of
    (seed, step) alone, so a resumed run sees exactly the batches the uninterrupted run would have."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), num_samples - offset)
        out += perm[offset: offset + take].tolist()
    return out


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1]; -100 labels (prompt, padding) are ignored.
    ``reduction``: "mean" over the answer tokens, or "sum" (the training step divides by the step's token count)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction=reduction)


def answer_tokens(labels: torch.Tensor) -> int:
    """How many tokens ``answer_loss`` scores in ``labels`` (B, S)."""
    return int((labels[:, 1:] != IGNORE).sum())


@torch.no_grad()
def evaluate_answers(model, dataset, tokenizer, *, device, batch_size: int, max_new_tokens: int,
                     max_samples: int | None, rank: int, world_size: int, cache_dtype=None) -> dict[str, float]:
    """Greedy answers on ``dataset.prompt_sample(i)``; exact match after tokenizer normalisation."""
    from mmtrain.data.collate import padded_collate_tiled_images_and_mask
    from mmtrain.generation import generate

    n = len(dataset) if not max_samples else min(len(dataset), int(max_samples))
    mine = list(range(rank, n, world_size))
    per_rank = math.ceil(n / world_size)
    num_batches = math.ceil(per_rank / batch_size)
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    examples: list[tuple[str, str]] = []
    for b in range(num_batches):
        chunk = mine[b * batch_size: (b + 1) * batch_size]
        weights = [1.0] * len(chunk)
        if not chunk:  # every rank runs the same number of forward passes (FSDP collectives)
            chunk, weights = [0], [0.0]
        prompts, answers = zip(*(dataset.prompt_sample(i) for i in chunk))
        batch = _to_device(padded_collate_tiled_images_and_mask(list(prompts), padding_idx=tokenizer.pad_id,
                                                                pad_direction="left"), device)
        out = generate(model, batch["tokens"], max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
                       stop_tokens=tokenizer.stop_tokens, encoder_input=batch["encoder_input"],
                       encoder_mask=batch["encoder_mask"], stop_early=world_size == 1, cache_dtype=cache_dtype)
        generated = out[:, batch["tokens"].shape[1]:].tolist()
        for row, answer, w in zip(generated, answers, weights):
            if tokenizer.eot_id in row:
                row = row[: row.index(tokenizer.eot_id)]
            predicted = tokenizer.decode(row)
            correct[0] += w * float(predicted == answer)
            correct[1] += w
            if w and len(examples) < 3:
                examples.append((predicted, answer))
    if world_size > 1:
        torch.distributed.all_reduce(correct)
    return {"val/answer_acc": float(correct[0] / correct[1].clamp(min=1)), "examples": examples}


# ------------------------------------------------------------------------------------------------------- main
def main(cfg: DictConfig) -> dict:
    from mmtrain.data.collate import padded_collate_tiled_images_and_mask
    from mmtrain.models.llama3_2_vision._memory import count_parameters
    from mmtrain.training.checkpoint import (
        CheckpointManager,
        export_model,
        finished_and_exported,
        set_aside_earlier_run,
    )
    from mmtrain.training.distributed import (
        all_reduce_mean,
        apply_activation_checkpointing,
        cast_frozen_parameters,
        compile_model,
        destroy,
        init_distributed,
        split_global_batch,
        unwrap_model,
        wrap_model,
    )
    from mmtrain.training.metrics import MetricLogger, final_values

    t_start = time.perf_counter()
    check_tiling(cfg)
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    dist_info = init_distributed(cfg.get("device", "auto"))
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    output_dir = str(cfg.output_dir)
    max_steps = int(cfg.max_steps)
    precision = str(cfg.get("precision", "fp32"))
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision: expected fp32 or bf16, got {precision!r}")
    sdpa_backend_order(str(cfg.get("sdpa_backend", "auto")))  # an unknown kernel name: one line, before building
    guard = NonFiniteGuard(**(cfg.get("nonfinite", None) or {}))  # a bad policy: one line, before building
    strategy = str(OmegaConf.select(cfg, "distributed.strategy") or "none")
    split = split_global_batch(int(cfg.batch_size), world, OmegaConf.select(cfg, "micro_batch_size"))

    tokenizer = instantiate(cfg.tokenizer)
    train_ds = instantiate(cfg.dataset, split="train", tokenizer=tokenizer)
    val_ds = instantiate(cfg.dataset, split="validation", tokenizer=tokenizer)

    # On a GPU the model is built there directly: random init of the 11B model takes seconds on the device against
    # minutes on the host, and no rank holds a full fp32 copy in host memory.
    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
        model = instantiate(cfg.model)
    embeddings = model.decoder.tok_embeddings
    base_vocab = getattr(embeddings, "embedding", embeddings).num_embeddings
    if not base_vocab <= tokenizer.image_token_id < getattr(embeddings, "num_embeddings", base_vocab):
        raise ConfigError(f"tokenizer.image_token_id: {tokenizer.image_token_id} must be one of the model's fusion "
                          f"tokens [{base_vocab}, {embeddings.num_embeddings})")
    if tokenizer.vocab_size > base_vocab:
        raise ConfigError(f"model.vocab_size: {base_vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    ckpt = CheckpointManager(output_dir, keep=OmegaConf.select(cfg, "checkpoint.keep") or 2, log_fn=print)
    resume_path = ckpt.resolve_resume(cfg.get("resume", "auto"))
    if cfg.get("pretrained") and resume_path is None:  # a resumed run reads every weight from its checkpoint
        from mmtrain.models.llama3_2_vision._pretrained import load_pretrained

        message = load_pretrained(model, str(cfg.pretrained))
        if rank == 0:
            print(message)
    total_params, trainable_params = count_parameters(model)
    apply_fused_qkv_setting(model, cfg.get("fused_qkv", "auto"), str(cfg.get("sdpa_backend", "auto")))

    if cfg.get("activation_checkpointing", False):
        apply_activation_checkpointing(model)
    compile_model(model, mode=str(cfg.get("compile", "none") or "none"))
    fsdp_mp = precision if strategy == "fsdp" else None
    # Sharded on several ranks, FSDP2 casts parameters to bf16 itself; otherwise autocast does the bf16 compute.
    fsdp_bf16 = precision == "bf16" and strategy == "fsdp" and world > 1
    use_autocast = precision == "bf16" and not fsdp_bf16
    if fsdp_bf16:
        cast_frozen_parameters(model, torch.bfloat16)  # FSDP gathers them in bf16 anyway: same numbers, half memory
    model = wrap_model(model, strategy=strategy, device=device, mixed_precision=fsdp_mp,
                       find_unused_parameters=False, reduce_dtype=OmegaConf.select(cfg, "distributed.reduce_dtype"))
    inner = unwrap_model(model)
    if device.type == "cuda":  # the peak reported in the log is training's, not the build's (full model per rank)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sdpa = str(cfg.get("sdpa_backend", "auto"))

    @contextlib.contextmanager
    def autocast():
        """bf16 autocast where it applies, and the SDPA kernel preference, around each forward."""
        with sdpa_backend(sdpa):
            if use_autocast:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    yield
            else:
                yield
    compute_dtype = torch.bfloat16 if fsdp_bf16 else None

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("model: nothing is trainable (set decoder_trainable, encoder_trainable or "
                          "fusion_trainable to true/full, or add adapters: lora_attn_modules, or a lora_* builder)")
    optimizer = instantiate(cfg.optimizer)(params)
    scheduler = instantiate(cfg.lr_scheduler)(optimizer) if cfg.get("lr_scheduler") else None

    if resume_path is None:
        set_aside_earlier_run(output_dir)
    log_cfg = cfg.get("log", {}) or {}
    logger = MetricLogger(output_dir, rank=rank, total_steps=max_steps, wandb=log_cfg.get("wandb", False),
                          run_config=OmegaConf.to_container(cfg, resolve=True),
                          progress_bar=log_cfg.get("progress_bar", True))
    start_step = 0
    if resume_path is not None:
        state = ckpt.load(resume_path, model, optimizer, scheduler)
        start_step = int(state["step"])
        guard.load_state_dict(state)
        logger.forget_after(start_step)
    logger.print(f"vlm_finetune: {total_params:,} parameters, {trainable_params:,} trainable; {len(train_ds)} "
                 f"train / {len(val_ds)} validation samples; {world} process(es), {strategy}, {precision}, "
                 f"device {device}" + (f"; resumed at step {start_step}" if start_step else ""))

    if finished_and_exported(Path(output_dir) / "model", start_step, max_steps):
        # A rerun of a finished run: it was trained, evaluated and exported at this step already.
        final_loss, final_eval = final_values(logger.jsonl_path, start_step)
        logger.print(f"already complete: trained to step {start_step} (max_steps {max_steps}), evaluated and "
                     f"exported to {Path(output_dir) / 'model'}; resume=none starts over, a larger max_steps "
                     "trains on")
        logger.close()
        destroy()
        return {"steps": start_step, "loss": final_loss, **final_eval,
                "nonfinite_steps": guard.skipped, "parameters": total_params,
                "trainable_parameters": trainable_params, "time_s": round(time.perf_counter() - t_start, 1),
                "output_dir": output_dir, "export_dir": str(Path(output_dir) / "model"), "already_complete": True}

    eval_cfg = cfg.get("eval", {}) or {}
    eval_every = int(eval_cfg.get("every_n_steps", 0) or 0)
    ckpt_every = int(OmegaConf.select(cfg, "checkpoint.every_n_steps") or 0)
    log_every = int(log_cfg.get("every_n_steps", 10) or 10)

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate_answers(inner, val_ds, tokenizer, device=device,
                                  batch_size=int(eval_cfg.get("batch_size", 64)),
                                  max_new_tokens=int(eval_cfg.get("max_new_tokens", 4)),
                                  max_samples=eval_cfg.get("max_samples"), rank=rank, world_size=world,
                                  cache_dtype=compute_dtype)
        examples = result.pop("examples")
        logger.log(step, result, prefix="eval")
        if examples:
            logger.print("  e.g. " + "; ".join(f"{p!r} (want {a!r})" for p, a in examples))
        return result

    model.train()
    last_loss = float("nan")
    last_eval: dict[str, float] = {}
    step = start_step
    window_seconds, window_steps = 0.0, 0
    for step in range(start_step + 1, max_steps + 1):
        step_start = time.perf_counter()
        indices = _batch_indices(step - 1, split.global_batch_size, len(train_ds), seed)
        mine = indices[rank * split.per_rank_batch_size: (rank + 1) * split.per_rank_batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        micro_batches = [padded_collate_tiled_images_and_mask(
            [train_ds[i] for i in mine[m * split.micro_batch_size: (m + 1) * split.micro_batch_size]],
            padding_idx=tokenizer.pad_id) for m in range(split.accumulation_steps)]
        # Each token weighs the same in the step's loss, as in torchtune: divide by the step's answer tokens over
        # all micro-batches and ranks, not by micro-batch means (which weigh a short answer's tokens more, so the
        # update would depend on micro_batch_size and the number of ranks). x world: DDP/FSDP average over ranks.
        step_tokens = all_reduce_mean(torch.tensor(float(sum(answer_tokens(b["labels"]) for b in micro_batches)),
                                                   device=device)) * world
        token_scale = world / step_tokens.clamp(min=1.0)
        for batch in micro_batches:
            batch = _to_device(batch, device)
            with autocast():
                logits = model(batch["tokens"], encoder_input=batch["encoder_input"],
                               encoder_mask=batch["encoder_mask"])
                loss = answer_loss(logits, batch["labels"], reduction="sum") * token_scale
            loss.backward()
            loss_sum += loss.detach()
        # As in contrastive: 0 or null is no clipping (the norm is still measured and logged).
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float(cfg.get("clip_grad_norm", 1.0) or math.inf))
        # Every rank sees the same mean loss and (all-reduced) gradient norm, so all apply or skip the step alike.
        step_loss, step_grad_norm = float(all_reduce_mean(loss_sum.clone())), float(grad_norm)
        if guard.check(step, step_loss, step_grad_norm):  # may raise NonFiniteLossError (policy stop)
            optimizer.step()
            last_loss = step_loss
        else:
            logger.print(f"step {step}: non-finite loss {step_loss} / grad norm {step_grad_norm}; step skipped "
                         f"({guard.skipped} so far, policy {guard.policy})")
        if scheduler is not None:
            scheduler.step()
        # The step's host time is its device time too: reading the loss above waited for the GPU.
        window_seconds += time.perf_counter() - step_start
        window_steps += 1
        if step % log_every == 0 or step == max_steps:
            # Throughput of the training steps since the last log line, evaluation and checkpoints left out (the
            # first window includes compilation).
            elapsed = max(window_seconds, 1e-9)
            metrics = {"loss": step_loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": step_grad_norm,
                       "nonfinite_steps": guard.skipped, "step_s": elapsed / window_steps,
                       "samples_per_s": split.global_batch_size * window_steps / elapsed}
            if device.type == "cuda":
                metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            logger.log(step, metrics)
            window_seconds, window_steps = 0.0, 0
        logger.advance(1, loss=step_loss)
        if eval_every and step % eval_every == 0 and step != max_steps:
            last_eval = run_eval(step)
        # No checkpoint of a non-finite step: the last good one stays the newest (nonfinite.py's promise).
        if ckpt_every and step % ckpt_every == 0 and step != max_steps and not guard.consecutive:
            ckpt.save(step, model, optimizer, scheduler, guard.state_dict())

    final_step = max(max_steps, start_step)  # a checkpoint past max_steps is evaluated at its own step
    if max_steps > start_step or not last_eval:
        last_eval = run_eval(final_step)
    # checkpoint.every_n_steps 0 / null: no checkpoint at all, as in the contrastive recipe (benchmark runs).
    if ckpt_every and max_steps > start_step and not guard.consecutive:
        ckpt.save(max_steps, model, optimizer, scheduler, guard.state_dict())
    # Consolidated weights (torchtune's key names) + the run config; collective under FSDP, rank 0 writes.
    export_dir = (export_model(inner, Path(output_dir) / "model", cfg, step=final_step,
                               adapter_weights_only=bool(cfg.get("save_adapter_weights_only", False)))
                  if cfg.get("export", True) else None)
    logger.close()
    summary = {"steps": final_step, "loss": last_loss, **last_eval, "nonfinite_steps": guard.skipped,
               "parameters": total_params,
               "trainable_parameters": trainable_params, "time_s": round(time.perf_counter() - t_start, 1),
               "output_dir": output_dir, "export_dir": export_dir and str(export_dir)}
    peak = ""
    if device.type == "cuda":
        summary["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        peak = f" | peak {summary['peak_mem_gib']:.1f} GiB/GPU"
    logger.print(f"summary: {final_step} steps | loss {last_loss:.4f} | val/answer_acc "
                 f"{last_eval.get('val/answer_acc', float('nan')):.3f} | {summary['time_s']}s{peak} | {output_dir}")
    destroy()
    return summary


if __name__ == "__main__":
    from mmtrain.config import recipe_entry

    recipe_entry(main)
