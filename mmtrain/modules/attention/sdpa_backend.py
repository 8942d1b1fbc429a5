"""Which fused kernel ``scaled_dot_product_attention`` tries first, as a config switch.

    with sdpa_backend("cudnn"):      # "auto" (torch's order), "cudnn", "flash", "efficient", "math", "fa4"
        loss = step(batch)

The named backend goes first and every other one stays enabled behind it (``sdpa_kernel(..., set_priority=True)``),
so a shape the chosen kernel cannot take (a head dim, a mask, CPU tensors) falls back instead of failing. torch's
own order puts flash attention before cuDNN; on Hopper, cuDNN's attention is the faster kernel for many shapes.
Enter the context around the whole step, compilation included: a compiled graph keeps the kernel chosen while it
was traced.

``"fa4"`` is not one of torch's backends: inside it, ``ScaledDotProduct`` sends every call FlashAttention-4 takes (no
mask other than causal, no dropout; see ``mmtrain.modules.attention.fa4``) to FA4, and SDPA runs the rest with cuDNN
first. It needs the ``fa4`` extra; naming it without the package is a ``ConfigError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel

from mmtrain.errors import ConfigError

# torch's default priority order; the chosen backend moves to the front.
_DEFAULT_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH)
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "fa4": SDPBackend.CUDNN_ATTENTION,  # SDPA's order for the calls FA4 does not take
}
FA4 = "fa4"

_prefer_fa4 = False  # set inside sdpa_backend("fa4"); a plain global, so TorchDynamo guards on it


def fa4_preferred() -> bool:
    """Whether the current ``sdpa_backend`` context sends dense attention to FlashAttention-4."""
    return _prefer_fa4


def sdpa_backend_order(name: str | None) -> list[SDPBackend] | None:
    """The priority list for ``name`` (None for "auto"/None: leave torch's choice alone)."""
    if name is None or str(name) == "auto":
        return None
    if str(name) not in SDPA_BACKENDS:
        raise ConfigError(f"sdpa_backend: unknown {name!r}; choose auto, {', '.join(SDPA_BACKENDS)}")
    if str(name) == FA4:
        from mmtrain.modules.attention.fa4 import INSTALL_HINT, fa4_import_error, fa4_module

        if fa4_module() is None:
            raise ConfigError(f"sdpa_backend: fa4 needs FlashAttention-4, which did not load ({fa4_import_error()}); "
                              f"{INSTALL_HINT}")
    first = SDPA_BACKENDS[str(name)]
    return [first] + [backend for backend in _DEFAULT_ORDER if backend != first]


@contextlib.contextmanager
def sdpa_backend(name: str | None) -> Iterator[None]:
    """Context in which SDPA tries ``name``'s kernel first (see the module docstring)."""
    global _prefer_fa4
    order = sdpa_backend_order(name)
    if order is None:
        yield
        return
    previous = _prefer_fa4
    _prefer_fa4 = str(name) == FA4
    try:
        with sdpa_kernel(order, set_priority=True):
            yield
    finally:
        _prefer_fa4 = previous
