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

Precision: every loss computes with autocast off, in float32 (float64 when an input is float64), whatever the
caller's autocast and input dtypes; the result is a 0-dim tensor of that dtype. Under bf16 autocast the logits
would otherwise come from bf16 matmuls while the positive terms do not, and a confident positive's loss (a small
difference of large logits) would be rounding noise. The B x W*B matmuls are small next to the towers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.losses._precision import compute_dtype, no_autocast
from mmtrain.losses.distributed import all_gather_with_grad, neighbour_exchange_with_grad, world_info
from mmtrain.losses.tiled import tiled_row_reduce


def _check(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image_embeds and text_embeds must both be (batch, dim); got "
                         f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")


def _upcast(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
            logit_bias: torch.Tensor | float | None):
    """The loss's inputs in its compute dtype (float32, or float64 when any is float64); call with autocast off.

    Upcasting before any gather also makes the cross-rank gradient sums float32.
    """
    device = image_embeds.device
    scale = torch.as_tensor(logit_scale, device=device)
    bias = None if logit_bias is None else torch.as_tensor(logit_bias, device=device)
    dtype = compute_dtype(image_embeds, text_embeds, scale, bias)
    return (image_embeds.to(dtype), text_embeds.to(dtype), scale.to(dtype),
            None if bias is None else bias.to(dtype))


def _softmax_ce_rows(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, offset: int,
                     label_smoothing: float, tiled: bool, block: int) -> torch.Tensor:
    """Mean over rows i of CE(scale * q_i . K^T, label i + offset) with label smoothing. (N, D), (M, D) -> 0-dim.

    Tiled, written as (lse_i - logit_i,label) + eps * logit_i,label - eps/M * sum_j logit_ij; the first term comes
    from one set of logits (``tiled_row_reduce``'s positive), the last sum is q_i . sum_j k_j.
    """
    n, m = queries.shape[0], keys.shape[0]
    if not tiled:
        labels = torch.arange(n, device=queries.device) + offset
        return F.cross_entropy(scale * (queries @ keys.t()), labels, label_smoothing=label_smoothing)
    loss = tiled_row_reduce(queries, keys, scale, None, "logsumexp", block, positive_offset=offset)
    if label_smoothing:
        positive = scale * (queries * keys[offset:offset + n]).sum(dim=1)
        loss = loss + label_smoothing * positive - label_smoothing / m * scale * (queries @ keys.sum(dim=0))
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
        with no_autocast(image_embeds.device):
            image_embeds, text_embeds, scale, _ = _upcast(image_embeds, text_embeds, logit_scale, None)
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

    The bias normally comes from the model (``get_logit_bias()``). Only a loss built with a number for
    ``init_logit_bias`` owns a learnable bias (``self.logit_bias``), used when the caller passes ``logit_bias=None``
    (add the loss's parameters to the optimizer then). With ``init_logit_bias=None`` the loss has no parameters and
    the caller must pass the bias: a bias that no forward reads would leave DDP waiting for its gradient.

    Args:
        gather: exchange text embeddings around the ring of ranks (world > 1).
        tiled: block-wise sums with recomputation in backward.
        block_size: text rows per block when tiled.
        init_logit_bias: initial value of the loss's own bias (SigLIP's -10), or None for no bias of its own.
        group: process group (default: the world).
    """

    def __init__(self, gather: bool = True, tiled: bool = False, block_size: int = 1024,
                 init_logit_bias: float | None = -10.0, group=None) -> None:
        super().__init__()
        self.gather = gather
        self.tiled = tiled
        self.block_size = int(block_size)
        self.group = group
        if init_logit_bias is None:
            self.register_parameter("logit_bias", None)
        else:
            self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def check_logit_bias(self, logit_bias: torch.Tensor | float | None) -> None:
        """Raise ValueError unless exactly one bias is available: the caller's ``logit_bias`` or the loss's own.

        Both present: the loss's own would never be used (an unused trainable parameter); neither: no bias at all.
        """
        if logit_bias is None and self.logit_bias is None:
            raise ValueError("SigLipLoss has no logit bias of its own (init_logit_bias=None) and none was passed; "
                             "give the model a bias, or the loss one with init_logit_bias=-10")
        if logit_bias is not None and self.logit_bias is not None:
            raise ValueError("the model passes its own logit bias, so the loss's (init_logit_bias) would never be "
                             "used; build the loss with init_logit_bias=None")

    def _block_loss(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    positives: bool) -> torch.Tensor:
        """Sum over the block of -log sigmoid(z * logit) = softplus(-z * logit), on one set of logits."""
        if self.tiled:
            return tiled_row_reduce(images, texts, scale, bias, "softplus", self.block_size,
                                    positive_offset=0 if positives else None).sum()
        logits = scale * (images @ texts.t()) + bias
        if positives:
            # x - 2x is exactly -x: the diagonal's softplus(-x) without a softplus(x) - x cancellation
            logits = logits - 2 * torch.diag_embed(logits.diagonal())
        return F.softplus(logits).sum()

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float | None = None) -> torch.Tensor:
        _check(image_embeds, text_embeds)
        if logit_bias is None:
            self.check_logit_bias(None)
            logit_bias = self.logit_bias
        with no_autocast(image_embeds.device):
            image_embeds, text_embeds, scale, bias = _upcast(image_embeds, text_embeds, logit_scale, logit_bias)
            total = self._block_loss(image_embeds, text_embeds, scale, bias, positives=True)
            _, world = world_info(self.group) if self.gather else (0, 1)
            texts = text_embeds
            for _ in range(world - 1):
                texts = neighbour_exchange_with_grad(texts, self.group)
                total = total + self._block_loss(image_embeds, texts, scale, bias, positives=False)
            return total / image_embeds.shape[0]
