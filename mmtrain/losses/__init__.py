"""Contrastive losses (ALIGN, CLIP, SigLIP) with cross-rank gathering and a memory-tiled variant.

``loss(image_embeds (B, D), text_embeds (B, D), logit_scale 0-dim, logit_bias 0-dim | None) -> 0-dim``.
"""

from mmtrain.losses.contrastive import AlignLoss, ClipLoss, SigLipLoss
from mmtrain.losses.distributed import all_gather_with_grad, neighbour_exchange_with_grad
from mmtrain.losses.tiled import tiled_row_reduce

__all__ = [
    "AlignLoss",
    "ClipLoss",
    "SigLipLoss",
    "all_gather_with_grad",
    "neighbour_exchange_with_grad",
    "tiled_row_reduce",
]
