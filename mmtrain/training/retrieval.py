"""Retrieval and zero-shot metrics for dual encoders, over all ranks.

Inputs, N validation pairs of dimension D (L2-normalized embeddings; any float dtype):

- ``image_embeds`` (N, D), ``text_embeds`` (N, D): row i of both comes from pair i.
- ``caption_ids`` (N,) long: equal ids mean identical captions (several images may share one caption).

Metrics (fractions in [0, 1]):

- ``i2t_r@k``: an image is a hit when one of its k most similar texts carries its caption.
- ``t2i_r@k``: a text is a hit when one of its k most similar images carries that caption.
- ``zero_shot_acc``: each image is classified among the split's *distinct* captions (one text embedding per
  caption, its first occurrence) and counted correct when the best one is its own caption.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, caption_ids: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways and zero-shot accuracy; see the module docstring."""
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(f"expected matching (N, D) embeddings, got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    n = image_embeds.shape[0]
    if caption_ids.shape != (n,):
        raise ValueError(f"caption_ids must have shape ({n},), got {tuple(caption_ids.shape)}")
    if n == 0:
        raise ValueError("no validation pairs to evaluate")
    sim = image_embeds @ text_embeds.T  # (N images, N texts)
    same_caption = caption_ids[:, None] == caption_ids[None, :]  # (N, N): image i / text j share a caption
    metrics: dict[str, float] = {}
    for k in ks:
        kk = min(k, n)
        top_texts = sim.topk(kk, dim=1).indices  # (N, kk)
        metrics[f"i2t_r@{k}"] = same_caption.gather(1, top_texts).any(dim=1).double().mean().item()
        top_images = sim.T.topk(kk, dim=1).indices  # (N texts, kk)
        metrics[f"t2i_r@{k}"] = same_caption.T.gather(1, top_images).any(dim=1).double().mean().item()

    distinct, first_index = _first_occurrence(caption_ids)
    class_embeds = text_embeds[first_index]  # (C, D)
    predicted = distinct[(image_embeds @ class_embeds.T).argmax(dim=1)]
    metrics["zero_shot_acc"] = (predicted == caption_ids).double().mean().item()
    metrics["num_classes"] = float(distinct.numel())
    return metrics


def _first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values (sorted) and the index of each one's first occurrence."""
    distinct, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((distinct.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return distinct, first


def caption_ids_from_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) token ids -> (B,) int64 ids, equal exactly when the (unpadded) token sequences are equal.

    Hashes of int tuples do not depend on PYTHONHASHSEED, so ids agree across ranks and runs.
    """
    rows = []
    for b in range(input_ids.shape[0]):
        tokens = input_ids[b]
        if attention_mask is not None:
            tokens = tokens[attention_mask[b].bool()]
        rows.append(hash(tuple(tokens.tolist())))
    return torch.tensor(rows, dtype=torch.int64)


def gather_eval_outputs(image_embeds: torch.Tensor, text_embeds: torch.Tensor, caption_ids: torch.Tensor,
                        index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collect every rank's (image, text, caption id) rows, drop sampler padding duplicates by dataset
    ``index`` and sort by it, so every rank computes the metrics over the whole split in the same order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        image_embeds = _all_gather_rows(image_embeds)
        text_embeds = _all_gather_rows(text_embeds)
        caption_ids = _all_gather_rows(caption_ids)
        index = _all_gather_rows(index)
    order = torch.argsort(index.cpu(), stable=True)
    index_sorted = index.cpu()[order]
    keep = torch.ones_like(index_sorted, dtype=torch.bool)
    keep[1:] = index_sorted[1:] != index_sorted[:-1]
    order = order[keep]
    return image_embeds.cpu()[order], text_embeds.cpu()[order], caption_ids.cpu()[order]


def _all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from all ranks (ranks may hold different row counts)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else (
        torch.device("cpu"))
    local = tensor.to(device).contiguous()
    count = torch.tensor([local.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    chunks = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(chunks, padded)
    return torch.cat([chunk[: int(c.item())] for chunk, c in zip(chunks, counts)]).cpu()
