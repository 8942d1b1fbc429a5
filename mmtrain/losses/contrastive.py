"""Contrastive losses for dual encoders: ALIGN, CLIP (softmax cross-entropy both ways) and SigLIP (sigmoid).

Call: ``loss(image_embeds (B, D), text_embeds (B, D), logit_scale 0-dim, logit_bias 0-dim | None) -> 0-dim``.
Embeddings are expected L2-normalized; ``logit_scale`` is the multiplier of cosine similarities (ALIGN:
1/temperature; CLIP: exp(logit_scale) already clamped at 100 by the model).

Across ranks (``gather=True`` with an initialised process group of size > 1) every rank passes its local batch:

* ALIGN / CLIP gather both sides with gradient and use the local-loss form (open_clip's ``local_loss=True``):
  rank r scores its B images against all W*B texts with labels ``arange(B) + r*B``, and its B texts against all
  images. The mean over ranks of the per-rank losses (what DDP's gradient averaging optimises) equals the loss
  of the global batch, and so do the gradients.
* SigLIP passes text embeddings around the ring (neighbour exchange): rank r scores its images against its own
  texts (positives on the diagonal), then against every other rank's texts (all negatives). Normalised by the
  local batch, the mean over ranks is the global loss.

``tiled=True`` never builds the (B, W*B) logit matrix: see ``mmtrain.losses.tiled`` (same value and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.losses.distributed import all_gather_with_grad, neighbour_exchange_with_grad, world_info
from mmtrain.losses.tiled import tiled_row_reduce


def _check(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image_embeds and text_embeds must both be (batch, dim); got "
                         f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")


def _softmax_ce_rows(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, offset: int,
                     label_smoothing: float, tiled: bool, block: int) -> torch.Tensor:
    """Mean over rows i of CE(scale * q_i . K^T, label i + offset) with label smoothing. (N, D), (M, D) -> 0-dim.

    Written as lse_i - (1 - eps) * logit_i,label - eps/M * sum_j logit_ij; the last sum is q_i . sum_j k_j.
    """
    n, m = queries.shape[0], keys.shape[0]
    labels = torch.arange(n, device=queries.device) + offset
    if not tiled:
        logits = scale * (queries @ keys.t()).float()
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    lse = tiled_row_reduce(queries, keys, scale, None, "logsumexp", block)
    positive = scale * (queries * keys[offset:offset + n]).float().sum(dim=1)
    loss = lse - (1.0 - label_smoothing) * positive
    if label_smoothing:
        loss = loss - label_smoothing / m * scale * (queries.float() @ keys.float().sum(dim=0))
    return loss.mean()


class _SoftmaxContrastiveLoss(nn.Module):
    def __init__(self, label_smoothing: float, gather: bool = True, tiled: bool = False, block_size: int = 1024,
                 group=None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.gather = gather
        self.tiled = tiled
        self.block_size = int(block_size)
        self.group = group

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        _check(image_embeds, text_embeds)
        if logit_bias is not None:
            raise ValueError(f"{type(self).__name__} takes no logit_bias (use SigLipLoss for a biased sigmoid loss)")
        scale = torch.as_tensor(logit_scale, device=image_embeds.device).float()
        rank, world = world_info(self.group) if self.gather else (0, 1)
        if world > 1:
            all_images = all_gather_with_grad(image_embeds, self.group)
            all_texts = all_gather_with_grad(text_embeds, self.group)
        else:
            all_images, all_texts = image_embeds, text_embeds
        offset = rank * image_embeds.shape[0]
        image_loss = _softmax_ce_rows(image_embeds, all_texts, scale, offset, self.label_smoothing, self.tiled,
                                      self.block_size)
        text_loss = _softmax_ce_rows(text_embeds, all_images, scale, offset, self.label_smoothing, self.tiled,
                                     self.block_size)
        return (image_loss + text_loss) / 2


class AlignLoss(_SoftmaxContrastiveLoss):
    """ALIGN's loss: mean of image->text and text->image cross-entropies with label smoothing (0.1).

    Args:
        label_smoothing: smoothing of the one-hot targets.
        gather: gather across ranks when torch.distributed is initialised with world > 1.
        tiled: block-wise log-sum-exp with recomputation; memory B x block_size instead of B x W*B.
        block_size: columns per block when tiled.
        group: process group (default: the world).
    """

    def __init__(self, label_smoothing: float = 0.1, gather: bool = True, tiled: bool = False,
                 block_size: int = 1024, group=None) -> None:
        super().__init__(label_smoothing, gather, tiled, block_size, group)


class ClipLoss(_SoftmaxContrastiveLoss):
    """CLIP's loss: symmetric cross-entropy of ``logit_scale * image @ text.T`` (no label smoothing by default).

    Same arguments as ``AlignLoss``.
    """

    def __init__(self, label_smoothing: float = 0.0, gather: bool = True, tiled: bool = False,
                 block_size: int = 1024, group=None) -> None:
        super().__init__(label_smoothing, gather, tiled, block_size, group)


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss: ``-sum_ij log sigmoid(z_ij * (scale * x_i . y_j + bias)) / B``, z = +1 on
    the diagonal and -1 elsewhere.

    When the caller passes ``logit_bias=None`` the loss uses a learnable bias of its own (``self.logit_bias``,
    initialised to ``init_logit_bias`` = -10): add the loss's parameters to the optimizer.

    Args:
        gather: exchange text embeddings around the ring of ranks (world > 1).
        tiled: block-wise sums with recomputation in backward.
        block_size: text rows per block when tiled.
        init_logit_bias: initial value of the loss's own bias.
        group: process group (default: the world).
    """

    def __init__(self, gather: bool = True, tiled: bool = False, block_size: int = 1024,
                 init_logit_bias: float = -10.0, group=None) -> None:
        super().__init__()
        self.gather = gather
        self.tiled = tiled
        self.block_size = int(block_size)
        self.group = group
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def _block_loss(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    positives: bool) -> torch.Tensor:
        """Sum over the block of -log sigmoid(z * logit). softplus(-x) = softplus(x) - x gives the diagonal."""
        if self.tiled:
            total = tiled_row_reduce(images, texts, scale, bias, "softplus", self.block_size).sum()
        else:
            total = F.softplus(scale * (images @ texts.t()).float() + bias).sum()
        if positives:
            total = total - (scale * (images * texts).float().sum(dim=1) + bias).sum()
        return total

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        _check(image_embeds, text_embeds)
        scale = torch.as_tensor(logit_scale, device=image_embeds.device).float()
        bias = (self.logit_bias if logit_bias is None else torch.as_tensor(logit_bias, device=image_embeds.device))
        bias = bias.float()
        total = self._block_loss(image_embeds, text_embeds, scale, bias, positives=True)
        _, world = world_info(self.group) if self.gather else (0, 1)
        texts = text_embeds
        for _ in range(world - 1):
            texts = neighbour_exchange_with_grad(texts, self.group)
            total = total + self._block_loss(image_embeds, texts, scale, bias, positives=False)
        return total / image_embeds.shape[0]
