"""RoPE against a float64 complex-number reference (Meta's formulation)."""

import math

import pytest
import torch

from mmtrain.modules.rope import Llama3ScaledRoPE, RotaryPositionalEmbeddings


def complex_rope_reference(x: torch.Tensor, theta: list[float], positions: torch.Tensor) -> torch.Tensor:
    """x (b, s, h, d) float64; pairs (2i, 2i+1) as complex numbers times exp(1j * pos * theta_i)."""
    b, s, h, d = x.shape
    xc = torch.complex(x[..., 0::2], x[..., 1::2])  # (b, s, h, d/2)
    theta_t = torch.tensor(theta, dtype=torch.float64)
    pos = positions.to(torch.float64)
    if pos.ndim == 1:
        pos = pos.expand(b, s)
    angles = pos[..., None] * theta_t  # (b, s, d/2)
    rot = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
    out = xc * rot
    return torch.stack([out.real, out.imag], dim=-1).flatten(3)


def plain_theta(dim: int, base: float) -> list[float]:
    return [1.0 / base ** (2 * i / dim) for i in range(dim // 2)]


def llama3_scaled_theta(dim: int, base: float) -> list[float]:
    out = []
    for freq in plain_theta(dim, base):
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            out.append(freq)
        elif wavelen > 8192 / 1:
            out.append(freq / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append((1 - smooth) * freq / 8 + smooth * freq)
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_rope_matches_complex_reference(packed: bool) -> None:
    torch.manual_seed(0)
    dim, s = 16, 11
    rope = RotaryPositionalEmbeddings(dim=dim, max_seq_len=64, base=10_000)
    x = torch.randn(2, s, 3, dim)
    positions = torch.randint(0, 64, (2, s)) if packed else torch.arange(s)
    out = rope(x, input_pos=positions if packed else None)
    ref = complex_rope_reference(x.double(), plain_theta(dim, 10_000), positions)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_llama3_scaled_rope_frequencies_and_rotation() -> None:
    torch.manual_seed(1)
    dim = 64  # wide enough that all three frequency bands (kept, interpolated, divided) occur
    rope = Llama3ScaledRoPE(dim=dim, max_seq_len=20_000, base=500_000)
    expected = llama3_scaled_theta(dim, 500_000)
    torch.testing.assert_close(rope.theta.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    plain = plain_theta(dim, 500_000)
    assert any(abs(e - p) < 1e-12 for e, p in zip(expected, plain))  # high-frequency band kept
    assert any(abs(e - p / 8) < 1e-12 for e, p in zip(expected, plain))  # low-frequency band divided
    x = torch.randn(1, 5, 2, dim)
    positions = torch.tensor([0, 7, 300, 9000, 19_999])
    ref = complex_rope_reference(x.double(), expected, positions)
    torch.testing.assert_close(rope(x, input_pos=positions).double(), ref, atol=2e-4, rtol=1e-4)


def test_rope_builds_on_meta_device_and_keeps_dtype() -> None:
    with torch.device("meta"):
        rope = Llama3ScaledRoPE(dim=128, max_seq_len=131_072)
    assert rope.cache.is_meta and rope.cache.shape == (131_072, 64, 2)
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    assert RotaryPositionalEmbeddings(8)(x).dtype == torch.bfloat16


def test_rope_rejects_odd_dim() -> None:
    with pytest.raises(ValueError, match="even"):
        RotaryPositionalEmbeddings(dim=7)
