"""Rotary positional embeddings (RoPE): plain, with Llama 3.1's long-context frequency scaling, and 2-D for
image patches (``VisionRotaryPositionalEmbeddings``, shapes in its docstring).

Shapes:
    x: (b, s, n_h, h_d)                 queries or keys, head dimension last (h_d even)
    input_pos: None, (s,) or (b, s)     position of each token; None means 0..s-1
    -> (b, s, n_h, h_d), same dtype as x

Pairs of adjacent features (2i, 2i+1) are rotated by the angle ``pos * theta_i`` with
``theta_i = base ** (-2i / h_d)``: the interleaved layout of Meta's reference and torchtune, so torchtune
checkpoints need no permutation. The rotation is computed in float32 and cast back.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class RotaryPositionalEmbeddings(nn.Module):
    """RoPE with a cos/sin cache for positions ``0 .. max_seq_len - 1`` (torchtune's signature).

    Args:
        dim: per-head dimension (even).
        max_seq_len: positions cached at init (inputs without ``input_pos`` that are longer rebuild it).
        base: base of the geometric progression of rotation frequencies.
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: float = 10_000) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head dimension, got {dim}")
        self.dim = dim
        self.base = base
        self.max_seq_len = max_seq_len
        self._rope_init()

    # FSDP2 / meta-device initialisation calls reset_parameters to refill buffers after to_empty().
    def reset_parameters(self) -> None:
        self._rope_init()

    def _frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float64)[: self.dim // 2] / self.dim
        return 1.0 / (self.base**exponents)

    def _rope_init(self, device: torch.device | None = None) -> None:
        self.register_buffer("theta", self._frequencies(device).float(), persistent=False)
        self.build_rope_cache(self.max_seq_len)

    def build_rope_cache(self, max_seq_len: int = 4096) -> None:
        # Angles in float64: at position 1e5 a float32 angle is off by ~1e-2 rad; the cache itself is float32.
        theta = self._frequencies(self.theta.device)
        positions = torch.arange(max_seq_len, dtype=torch.float64, device=self.theta.device)
        angles = torch.outer(positions, theta)  # (max_seq_len, dim // 2)
        cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float()  # (max_seq_len, dim // 2, 2)
        self.register_buffer("cache", cache, persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _, _ = x.shape
        # No data-dependent check on input_pos (it would sync with the GPU and break torch.compile graphs);
        # positions past the cache fail in the indexing below.
        if input_pos is None and s > self.cache.shape[0]:
            self.build_rope_cache(s)
        rope = self.cache[:s] if input_pos is None else self.cache[input_pos]
        # (s, d/2, 2) or (b, s, d/2, 2) -> broadcast over batch and heads
        rope = rope.view(-1, s, 1, self.dim // 2, 2)
        pairs = x.float().reshape(b, s, x.shape[2], self.dim // 2, 2)
        cos, sin = rope[..., 0], rope[..., 1]
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
        return rotated.flatten(3).type_as(x)


class Llama3ScaledRoPE(RotaryPositionalEmbeddings):
    """RoPE with Llama 3.1 frequency scaling (used by Llama 3.2 Vision's decoder).

    Wavelengths shorter than ``old_context_len / high_freq_factor`` keep their frequency, those longer than
    ``old_context_len / low_freq_factor`` are divided by ``scale_factor``, and the band between interpolates
    smoothly. Computed with tensor ops (not a Python loop over floats) so it also builds on the meta device.
    """

    def __init__(
        self,
        dim: int,
        max_seq_len: int = 8192,
        base: float = 500_000,
        scale_factor: float = 8,
        low_freq_factor: float = 1,
        high_freq_factor: float = 4,
        old_context_len: int = 8192,
    ) -> None:
        if low_freq_factor == high_freq_factor:
            raise ValueError("Llama3ScaledRoPE needs low_freq_factor != high_freq_factor")
        self.scale_factor = scale_factor
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor
        self.old_context_len = old_context_len
        super().__init__(dim=dim, max_seq_len=max_seq_len, base=base)

    def _frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        freqs = super()._frequencies(device)
        low_freq_wavelen = self.old_context_len / self.low_freq_factor
        high_freq_wavelen = self.old_context_len / self.high_freq_factor
        wavelen = 2 * math.pi / freqs
        smooth = (self.old_context_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        interpolated = (1 - smooth) * freqs / self.scale_factor + smooth * freqs
        scaled = torch.where(wavelen > low_freq_wavelen, freqs / self.scale_factor, interpolated)
        return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


class VisionRotaryPositionalEmbeddings(nn.Module):
    """2-D (axial) RoPE for image patches, applied identically to every tile (torchtune's signature).

    Shapes:
        x: (b, s, n_h, h_d) with ``s = n_tiles * (patch_grid_size ** 2 + 1)`` and ``h_d = 2 * dim``
        -> (b, s, n_h, h_d), same dtype as x

    The patch at row ``y`` and column ``x`` of its tile (index ``y * grid + x``, row-major as the patch conv
    flattens it) rotates the pairs of the first half of the head dimension by ``(x + 1) * theta_i`` and those of
    the second half by ``(y + 1) * theta_i``, with ``theta_i = base ** (-2i / dim)`` for ``i < dim // 2`` and
    interleaved pairs ``(2j, 2j + 1)`` as in ``RotaryPositionalEmbeddings``. The CLS token (last of each tile with
    ``append_cls_token``, else first) is not rotated. The cos/sin cache has one row per token of a tile and is a
    non-persistent buffer, so checkpoints carry no key for it.

    Args:
        patch_size: side of a square patch.
        tile_size: side of a square tile; the tile holds ``(tile_size // patch_size) ** 2`` patches.
        max_num_tiles: kept for torchtune's signature. torchtune splits the sequence into exactly this many tiles;
            here the number of tiles is read from the sequence length, so images with fewer tiles (a batch padded
            to its own most tiles) also work and give the same result per tile.
        dim: rotary dimension per axis, ``head_dim // 2`` (even, so ``head_dim`` must be divisible by 4).
        base: base of the geometric progression of rotation frequencies.
        append_cls_token: True if the CLS token ends each tile, False if it starts it.

    Raises:
        ValueError: if ``dim`` is odd (at init), or if the sequence length is not a multiple of the tokens per tile
            or the head dimension is not ``2 * dim`` (in forward).
    """

    def __init__(
        self,
        patch_size: int,
        tile_size: int,
        max_num_tiles: int,
        dim: int,
        base: int = 10_000,
        append_cls_token: bool = True,
    ) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(
                f"VisionRotaryPositionalEmbeddings needs an even dim (head_dim // 2, so head_dim divisible by 4), "
                f"got dim={dim}"
            )
        self.patch_grid_size = tile_size // patch_size
        self.max_num_tiles = max_num_tiles
        self.dim = dim
        self.base = base
        self.append_cls_token = append_cls_token
        self.rope_init()

    # FSDP2 / meta-device initialisation calls reset_parameters to refill buffers after to_empty().
    def reset_parameters(self) -> None:
        self.rope_init()

    def _frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float64)[: self.dim // 2] / self.dim
        return 1.0 / (self.base**exponents)

    def rope_init(self) -> None:
        device = self.theta.device if hasattr(self, "theta") else None
        self.register_buffer("theta", self._frequencies(device).float(), persistent=False)
        self.build_rope_cache()

    def build_rope_cache(self) -> None:
        grid = self.patch_grid_size
        device = self.theta.device
        patch_idx = torch.arange(grid * grid, dtype=torch.int64, device=device)
        # Grid positions start at 1 (torchtune), so a patch in row/column 0 is still rotated.
        x_pos = (patch_idx % grid + 1).to(torch.float64)
        y_pos = (patch_idx // grid + 1).to(torch.float64)
        theta = self._frequencies(device)
        angles = torch.cat([torch.outer(x_pos, theta), torch.outer(y_pos, theta)], dim=-1)  # (grid**2, dim)
        # The CLS token gets angle 0: cos 1, sin 0, the identity.
        cls_angles = angles.new_zeros(1, self.dim)
        angles = torch.cat([angles, cls_angles] if self.append_cls_token else [cls_angles, angles], dim=0)
        cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float()  # (grid**2 + 1, dim, 2)
        self.register_buffer("cache", cache, persistent=False)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """x (b, s, n_h, h_d) -> same shape; ``input_pos`` and other keywords are ignored (MultiHeadAttention passes
        them to every positional embedding): positions come from each token's place in its tile."""
        bsz, seq_len, n_h, h_d = x.shape
        tokens_per_tile = self.cache.shape[0]
        if seq_len % tokens_per_tile != 0:
            raise ValueError(
                f"Input sequence length {seq_len} is not a multiple of the 2D RoPE tokens per tile "
                f"{tokens_per_tile} ((tile_size // patch_size) ** 2 + 1)"
            )
        if h_d != 2 * self.dim:
            raise ValueError(f"2D RoPE with dim={self.dim} needs head_dim {2 * self.dim}, got {h_d}")
        # (b, n_tiles, tokens_per_tile, n_h, h_d // 2, 2): every tile gets the same rotation.
        pairs = x.float().reshape(bsz, seq_len // tokens_per_tile, tokens_per_tile, n_h, h_d // 2, 2)
        rope = self.cache.view(1, 1, tokens_per_tile, 1, h_d // 2, 2)
        cos, sin = rope[..., 0], rope[..., 1]
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
        return rotated.reshape(bsz, seq_len, n_h, h_d).type_as(x)
