"""Train a tiny CLIP dual encoder for a few steps on a fixed global batch; run directly or under torchrun.

    python tests/distributed/dist_train_tiny.py --strategy none --out one.json
    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/dist_train_tiny.py --strategy fsdp --out two.json
    ... --device cuda      # one GPU per rank, NCCL (default: cpu, gloo)

Every rank builds the same model from the same seed and takes its slice of the same global batch, so the losses
must match the single-process run. The loss is computed on embeddings gathered from all ranks with gradient
(``torch.distributed.nn.functional.all_gather``), written out plainly here, or with mmtrain's losses
(``--loss mmtrain-clip`` / ``mmtrain-siglip``). Rank 0 writes JSON: per-step losses, the final parameter checksum.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from mmtrain.training import distributed

VOCAB, IMAGE, SEQ = 64, 16, 8


def build_model(siglip: bool = False) -> torch.nn.Module:
    from mmtrain.models.clip._dual_builders import clip_dual_encoder

    torch.manual_seed(0)
    return clip_dual_encoder(
        image_size=IMAGE, patch_size=8, vision_width=16, vision_layers=2, vision_heads=2, vocab_size=VOCAB,
        context_length=SEQ, text_width=16, text_layers=2, text_heads=2, embed_dim=16,
        init_logit_scale=2.3 if siglip else 2.6593, init_logit_bias=-10.0 if siglip else None,
    )


def global_batch(step: int, size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(3, SEQ + 1, (size,), generator=gen)
    attention_mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    return {
        "pixel_values": torch.randn(size, 3, IMAGE, IMAGE, generator=gen),
        "input_ids": torch.randint(1, VOCAB, (size, SEQ), generator=gen) * attention_mask,
        "attention_mask": attention_mask,
    }


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(b, d) per rank -> (world * b, d) on every rank, gradients flowing back to each rank's rows."""
    if distributed.get_dist_info()[1] == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def plain_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    image, text = gather_rows(image), gather_rows(text)
    logits = scale * image @ text.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def plain_siglip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    image, text = gather_rows(image), gather_rows(text)
    logits = scale * image @ text.T + bias
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def make_loss(name: str):
    if name == "plain-clip":
        return lambda i, t, s, b: plain_clip_loss(i, t, s)
    if name == "plain-siglip":
        return plain_siglip_loss
    from mmtrain import losses

    loss = losses.ClipLoss() if name == "mmtrain-clip" else losses.SigLipLoss()
    return lambda i, t, s, b: loss(i, t, s, b)


def run(strategy: str, steps: int, batch_size: int, loss_name: str, micro_batch_size: int | None = None,
        device: str = "cpu") -> dict:
    info = distributed.init_distributed(device=device)
    if info.device.type == "cuda":  # fp32 matmuls, so one GPU and two agree to float32 noise
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    split = distributed.split_global_batch(batch_size, info.world_size, micro_batch_size)
    model = build_model(siglip="siglip" in loss_name)
    # CLIP reaches every parameter, and the logit scale is read outside forward (dual_encoder_forward): DDP must
    # not search for unused parameters, or it would mark logit_scale ready before its gradient exists.
    model = distributed.wrap_model(model, strategy=strategy, device=info.device, find_unused_parameters=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss_fn = make_loss(loss_name)
    losses: list[float] = []
    for step in range(steps):
        batch = global_batch(step, batch_size)
        start = info.rank * split.per_rank_batch_size
        step_loss = torch.zeros((), device=info.device)
        for micro in range(split.accumulation_steps):
            lo = start + micro * split.micro_batch_size
            rows = {k: v[lo : lo + split.micro_batch_size].to(info.device) for k, v in batch.items()}
            last = micro == split.accumulation_steps - 1
            with distributed.grad_sync(model, enabled=last):
                out = distributed.dual_encoder_forward(
                    model, rows["pixel_values"], rows["input_ids"], rows["attention_mask"]
                )
                loss = loss_fn(*out)
                (loss / split.accumulation_steps).backward()
            step_loss += loss.detach() / split.accumulation_steps
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(distributed.all_reduce_mean(step_loss)))
        distributed.maybe_inject_fault(step + 1)  # MMTRAIN_FAULT_STEP: a crash for --max-restarts tests
    checksum = 0.0
    for param in model.parameters():
        sharded = hasattr(param, "to_local")
        local = param.to_local() if sharded else param
        # FSDP2 holds a shard per rank: sum the shards; replicated parameters: count rank 0 only.
        part = local.detach().double().abs().sum()
        if sharded or info.rank == 0:
            checksum += float(part)
    total = torch.tensor(checksum, dtype=torch.float64, device=info.device)
    if info.is_distributed:
        torch.distributed.all_reduce(total)
    result = {"losses": losses, "checksum": float(total), "world_size": info.world_size,
              "accumulation_steps": split.accumulation_steps}
    distributed.barrier()
    distributed.destroy()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="none")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--loss", default="plain-clip")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run(args.strategy, args.steps, args.batch_size, args.loss, args.micro_batch_size, args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    from mmtrain.config._entry import exit_with

    exit_with(main)
