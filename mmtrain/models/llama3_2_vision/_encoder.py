"""The Llama 3.2 Vision encoder: CLIP backbone plus a projection head into the decoder width (torchtune's
``Llama3VisionEncoder`` and ``Llama3VisionProjectionHead``; keys ``clip.*``, ``projection.layers.{i}.*``,
``projection.output.*``).

Notation: b batch, i images per sample, t tiles per image, e tokens per tile (patches + CLS), d width,
s = i * t * e.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Llama3VisionEncoder", "Llama3VisionProjectionHead"]


class Llama3VisionProjectionHead(nn.Module):
    """Transformer layers over the CLIP output, then the output concatenated with the CLIP hidden states and
    projected to the decoder width.

    Args:
        layers: the projection-head transformer layers.
        output: linear layer from ``(num_hidden_inputs + 1) * encoder_dim`` to ``decoder_dim``.
        num_hidden_inputs: number of CLIP hidden states given to ``forward``.

    forward: x (b, i, t, e, d_enc), hidden_states list of (b, i, t, e, d_enc) -> (b, s, d_dec).
    """

    def __init__(self, layers: nn.Module, output: nn.Module, num_hidden_inputs: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.output = output
        self.num_hidden = num_hidden_inputs

    def forward(self, x: torch.Tensor, hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        bsz, imgs, tiles, embeds, dim = x.shape
        x = x.reshape(bsz * imgs, tiles * embeds, dim)
        for layer in self.layers:
            x = layer(x)
        x = x.reshape(bsz, imgs, tiles, embeds, dim)
        if self.num_hidden > 0:
            if hidden_states is None or len(hidden_states) != self.num_hidden:
                got = 0 if hidden_states is None else len(hidden_states)
                raise ValueError(f"the projection head expects {self.num_hidden} hidden states, got {got}")
            # torchtune's layout, which the checkpoint's output weights assume: features interleaved as
            # (d, n_hidden) -> d * n_hidden, appended after the d output features.
            stacked = torch.stack(hidden_states, dim=-1).reshape(bsz, imgs, tiles, embeds, -1)
            x = torch.cat([x, stacked], dim=-1)
        return self.output(x).reshape(bsz, imgs * tiles * embeds, -1)


class Llama3VisionEncoder(nn.Module):
    """CLIP vision transformer followed by the projection head.

    forward: images (b, i, t, c, h, w), aspect_ratio (b, i, 2) or None -> (b, i * t * e, decoder_dim).
    """

    def __init__(self, clip: nn.Module, projection_head: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.projection = projection_head
        # Marks the projection head as a fusion module (trained even when the encoder is frozen), as torchtune's
        # register_fusion_module does; read by fusion-parameter helpers.
        self.projection._fusion_module = True  # type: ignore[attr-defined]

    def layer_modules(self) -> list[nn.Module]:
        """The repeated transformer layers of the CLIP backbone and the projection head."""
        return list(self.clip.layers) + list(self.projection.layers)

    def forward(self, images: torch.Tensor, aspect_ratio: torch.Tensor | None = None) -> torch.Tensor:
        x, hidden_states = self.clip(images, aspect_ratio)
        return self.projection(x, hidden_states)
