"""Positive random feature maps for the softmax kernel (Performers, Choromanski et al. 2020).

``phi: (*batch, S, D) -> (*batch, S, m)`` with ``E[phi(q) . phi(k)] = exp(q . k / sqrt(D))``. Every map first scales
its input by ``D ** -0.25`` (so the kernel is the one of scaled dot-product attention), then with ``x`` scaled and
``W`` the random projections (``features``, ``(D, m)`` or ``(D, m / 2)``):

    SMOrf         phi(x) = exp(x W - |x|^2 / 2 - log sqrt(m))                         W: orthogonal blocks, chi norms
    SMHyperbolic  phi(x) = [exp(x W + c), exp(-x W + c)],  c = -|x|^2 / 2 - log sqrt(m)    W: iid Gaussian
    SMReg         as SMHyperbolic, W orthogonal blocks with every column of norm sqrt(D)    (regularised softmax)

``normalize_inputs`` also subtracts, per sequence, the largest ``|x|^2`` (a constant that cancels in attention's
normalisation and keeps ``exp`` in range). Features are drawn from torch's RNG; ``redraw()`` draws new ones.

Constructor arguments as xFormers' ``SoftMaxPositiveEstimators``: ``(dim_features, iter_before_redraw=None,
normalize_inputs=False, epsilon=1e-6, softmax_temp=-1)``; ``softmax_temp`` replaces the ``D ** -0.25`` input scale
when positive, ``epsilon`` is added inside the exponential (it cancels in attention), and with
``iter_before_redraw`` the map draws new features after that many calls. ``dim_input`` (keyword) draws the features
at construction instead of at the first call.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import torch
from torch import nn


class FeatureMapType(str, enum.Enum):
    SMOrf = "sm_orf"
    SMHyp = "sm_hyp"
    SMReg = "sm_reg"


def orthogonal_gaussian(dim_input: int, count: int, device: torch.device | None = None) -> torch.Tensor:
    """``(dim_input, count)``: columns in blocks of ``dim_input`` mutually orthogonal unit vectors."""
    blocks = []
    for _ in range(math.ceil(count / dim_input)):
        gaussian = torch.randn(dim_input, dim_input, device=device)
        q, r = torch.linalg.qr(gaussian)
        # QR's sign convention biases Q; fixing the signs by R's diagonal makes Q uniformly (Haar) distributed.
        blocks.append(q * torch.sign(torch.diagonal(r))[None, :])
    return torch.cat(blocks, dim=1)[:, :count]


class SoftMaxPositiveEstimator(nn.Module):
    """Base: holds ``features`` (a buffer, saved in state dicts) and the scaling shared by the three maps."""

    hyperbolic: bool = True

    def __init__(self, dim_features: int, iter_before_redraw: int | None = None, normalize_inputs: bool = False,
                 epsilon: float = 1e-6, softmax_temp: float = -1, *, dim_input: int | None = None) -> None:
        super().__init__()
        if self.hyperbolic and dim_features % 2 != 0:
            raise ValueError(f"dim_features must be even for {type(self).__name__}, got {dim_features}")
        if iter_before_redraw is not None and int(iter_before_redraw) < 1:
            raise ValueError(f"iter_before_redraw must be >= 1 or None, got {iter_before_redraw}")
        self.dim_features = dim_features
        self.iter_before_redraw = None if iter_before_redraw is None else int(iter_before_redraw)
        self.normalize_inputs = normalize_inputs
        self.epsilon = float(epsilon)
        self.softmax_temp = float(softmax_temp)
        self.log_scale = math.log(math.sqrt(dim_features))
        self._calls_since_redraw = 0
        self.register_buffer("features", None)
        if dim_input is not None:
            self.redraw(dim_input)

    @property
    def num_projections(self) -> int:
        return self.dim_features // 2 if self.hyperbolic else self.dim_features

    def draw(self, dim_input: int, device: torch.device | None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def redraw(self, dim_input: int | None = None, device: torch.device | None = None) -> None:
        if dim_input is None:
            dim_input = self.features.shape[0]
        if device is None and self.features is not None:
            device = self.features.device
        self.features = self.draw(dim_input, device).float()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Features are drawn lazily at the first forward (their input width is only known then), so a freshly built
        # map has none yet: give it a buffer of the saved shape to load into, so the saved features are used.
        saved = state_dict.get(prefix + "features")
        if isinstance(saved, torch.Tensor) and (self.features is None or self.features.shape != saved.shape):
            device = saved.device if self.features is None else self.features.device
            self.features = torch.empty(saved.shape, dtype=torch.float32, device=device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features is None or self.features.shape[0] != x.shape[-1]:
            self.redraw(x.shape[-1], x.device)
        if self.iter_before_redraw is not None:  # counted only then: a changing int would recompile a compiled caller
            if self._calls_since_redraw >= self.iter_before_redraw:
                self.redraw(x.shape[-1], x.device)
                self._calls_since_redraw = 0
            self._calls_since_redraw += 1
        x = x * (self.softmax_temp if self.softmax_temp > 0 else x.shape[-1] ** -0.25)
        projected = x @ self.features.to(device=x.device, dtype=x.dtype)
        offset = -0.5 * (x * x).sum(dim=-1, keepdim=True) - self.log_scale + self.epsilon
        if self.normalize_inputs:
            offset = offset - (x * x).sum(dim=-1, keepdim=True).amax(dim=-2, keepdim=True)
        if self.hyperbolic:
            # One exp over [xW, -xW]: autograd keeps a single (S, m) result instead of two halves and their concat.
            projected = torch.cat((projected, -projected), dim=-1)
        return torch.exp(projected + offset)


class SMOrf(SoftMaxPositiveEstimator):
    """Positive orthogonal random features, SM+ort (Performers, Lemma 1)."""

    hyperbolic = False

    def draw(self, dim_input: int, device: torch.device | None) -> torch.Tensor:
        directions = orthogonal_gaussian(dim_input, self.num_projections, device)
        norms = torch.randn(dim_input, self.num_projections, device=device).norm(dim=0)  # chi(D) distributed
        return directions * norms


class SMHyperbolic(SoftMaxPositiveEstimator):
    """Positive hyperbolic random features, SMhyp+ (Performers, Lemma 1), iid Gaussian projections."""

    def draw(self, dim_input: int, device: torch.device | None) -> torch.Tensor:
        return torch.randn(dim_input, self.num_projections, device=device)


class SMReg(SoftMaxPositiveEstimator):
    """Regularised softmax kernel, SMREG+: orthogonal projections with every norm fixed to sqrt(D)."""

    def draw(self, dim_input: int, device: torch.device | None) -> torch.Tensor:
        return orthogonal_gaussian(dim_input, self.num_projections, device) * math.sqrt(dim_input)


FEATURE_MAPS: dict[FeatureMapType, type[SoftMaxPositiveEstimator]] = {
    FeatureMapType.SMOrf: SMOrf,
    FeatureMapType.SMHyp: SMHyperbolic,
    FeatureMapType.SMReg: SMReg,
}
