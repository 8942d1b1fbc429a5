"""FlashAttention-4 (``flash_attn.cute``, the optional ``fa4`` extra) as a kernel for dense and local attention.

Shapes as mmtrain's attention modules: ``q: (*batch, S_q, D)``, ``k: (*batch, S_k, D)``, ``v: (*batch, S_k, D_v)``
-> ``(*batch, S_q, D_v)``, with ``*batch`` either ``batch * heads`` or ``(batch, heads)``. FA4 takes
``(batch, seq, heads, dim)``: the transposes are views, handed over as they are (FA4 reads any layout whose last dim
is contiguous) and zero-padded in the head dim where FA4 needs it (see ``HEAD_DIM_MULTIPLE``). Under torch.compile
its forward and backward are the custom ops ``torch.ops.mmtrain.fa4_forward``/``fa4_backward``, which it traces
through; in eager mode the same kernels run from an autograd Function, without the ops' dispatch cost.

FA4 is written in CuTe DSL and compiles each kernel on its first call (seconds), then reuses it. On Hopper it runs
the attention shapes mmtrain needs faster than torch's kernels: the 11B vision encoder's head dim of 80, which
torch's flash kernel handles slowly, and sliding windows, where it visits only the key blocks of the band. The import
is lazy and guarded: without the extra (or on a machine where it cannot load) every caller keeps torch's kernels.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

INSTALL_HINT = "pip install 'mmtrain[fa4]' (flash-attn-4 with nvidia-cutlass-dsl[cu13]; Hopper or Blackwell GPUs)"

# The fa4 extra's pin. mmtrain calls this version's private kernel entry points (their signatures change between
# betas) and works around its SM90 dQ bug, so another version is refused unless the user opts in.
TESTED_VERSION = "4.0.0b40"
ANY_VERSION_ENV = "MMTRAIN_FA4_ANY_VERSION"

# Head dims reach FA4 zero-padded up to a multiple of this (same scores, same output once sliced). FA4 4.0.0b40's
# backward sizes its float32 dQ accumulator for head dims rounded up to 32 in the interface and its helper kernels
# (zeroing, read-back) but to 16 in the SM90 kernel that writes it, so at head dim 80 dQ came back wrong on an H100
# (62% of entries off; Dao-AILab/flash-attention#2896). Elsewhere mmtrain pads to 32, which sidesteps that; on SM90
# it hands the helpers 16 during its own backward calls (``_sm90_dq_accumulator_rounding``), so the three agree and
# head dim 80 runs as 80 rather than 96.
HEAD_DIM_MULTIPLE = 32
SM90_HEAD_DIM_MULTIPLE = 16

_module: ModuleType | None = None
_import_error: str | None = None
_probed = False
_suspended = False


def fa4_module() -> ModuleType | None:
    """``flash_attn.cute.interface``, or None when it is not installed or fails to load (the reason: ``fa4_import_error()``)."""
    global _module, _import_error, _probed
    if not _probed:
        _probed = True
        _import_error = _version_mismatch()
        if _import_error is not None:
            return None
        try:
            import flash_attn.cute.interface as module  # noqa: PLC0415 - optional, heavy: imported on first use only
        except Exception as err:  # noqa: BLE001 - a broken CUDA toolkit flavour raises RuntimeError, not ImportError
            _import_error = f"{type(err).__name__}: {err}"
        else:
            _module = module
    return _module


def _version_mismatch() -> str | None:
    """Why the installed flash-attn-4 is not used, or None when it is the tested one (or the user opted in)."""
    if os.environ.get(ANY_VERSION_ENV, "") not in ("", "0"):
        return None
    try:
        installed = importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return "flash-attn-4 is not installed"
    if installed == TESTED_VERSION:
        return None
    return (f"flash-attn-4 {installed} is installed, but mmtrain calls private kernels of {TESTED_VERSION} (the fa4 "
            f"extra's pin): pip install 'flash-attn-4=={TESTED_VERSION}', or set {ANY_VERSION_ENV}=1 to try this one")


def fa4_import_error() -> str | None:
    fa4_module()
    return _import_error


@contextlib.contextmanager
def fa4_suspended() -> Iterator[None]:
    """Callers keep torch's kernels inside this context: FLOP counting sees aten's attention ops, not FA4's."""
    global _suspended
    previous, _suspended = _suspended, True
    try:
        yield
    finally:
        _suspended = previous


def _padded(head_dim: int, multiple: int = HEAD_DIM_MULTIPLE) -> int:
    return -(-head_dim // multiple) * multiple


@torch.compiler.assume_constant_result  # a fixed fact of the device: compiled code need not trace the CUDA query
def _compute_capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def fa4_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FA4 takes these tensors: CUDA sm90+, fp16/bf16, head dims multiples of 8 (<= 256 on Hopper, <= 128
    elsewhere, after padding), and the package loads."""
    if _suspended:
        return False
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype):
        return False
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    if k.shape[-1] != head_dim or head_dim % 8 or head_dim_v % 8:
        return False
    major = _compute_capability_major(q.device)
    limit = 256 if major == 9 else 128
    if major < 9 or _padded(head_dim) > limit or _padded(head_dim_v) > limit:
        return False
    return fa4_module() is not None


def _to_bshd(x: torch.Tensor) -> torch.Tensor:
    """``(*batch, S, D)`` -> ``(batch, S, heads, D)`` as a view (heads = 1 for a 3-D input)."""
    if x.ndim == 3:
        return x.unsqueeze(2)
    if x.ndim == 4:
        return x.transpose(1, 2)
    return x.reshape(-1, x.shape[-3], x.shape[-2], x.shape[-1]).transpose(1, 2)


def _on_sm90(x: torch.Tensor) -> bool:
    return x.is_cuda and _compute_capability_major(x.device) == 9


def _head_dim_multiple(q: torch.Tensor) -> int:
    return SM90_HEAD_DIM_MULTIPLE if _on_sm90(q) else HEAD_DIM_MULTIPLE


def _padded_rows(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Zero columns up to ``head_dim`` (they add nothing to ``q k^T``; in v they give output columns that are cut
    off). FA4 reads any layout whose last dim is contiguous, so a ``(batch, heads, S, D)`` tensor's transposed view
    goes in as it is, without a copy (and the backward keeps the views, not copies, for its inputs)."""
    if x.shape[-1] != head_dim:
        return F.pad(x, (0, head_dim - x.shape[-1]))
    return x if x.stride(-1) == 1 else x.contiguous()


# FA4's forward and backward as two custom ops, so that TorchDynamo traces attention as one node of the graph (a
# compiled layer stays one graph; inductor sees the padding and the layout changes around it) instead of breaking
# the graph at a kernel it cannot read. Inputs are (batch, S, heads, D) with the last dim contiguous, in any
# layout; out is contiguous, lse (batch, heads, S_q) float32, and dq, dk, dv have the layout of q, k, v
# (``empty_like``, in the fake kernels too). FA4's own ``_flash_attn_fwd``/``_flash_attn_bwd`` (4.0.0b40) work.
_FORWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, float scale, bool causal, int? window_left, int? window_right)"
                   " -> (Tensor, Tensor)")
_BACKWARD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, bool causal,"
                    " int? window_left, int? window_right) -> (Tensor, Tensor, Tensor)")


@contextlib.contextmanager
def _sm90_dq_accumulator_rounding(module: ModuleType) -> Iterator[None]:
    """While FA4's SM90 backward runs, its dQ accumulator helpers round head dims to 16, as the kernel does."""
    names = ("_bwd_preprocess", "_bwd_postprocess_convert")
    originals = {name: getattr(module, name) for name in names}

    def rounding_to_16(helper: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("hdim_multiple_of") == 32:  # 64 (head dims above 128) already agrees with the kernel
                kwargs["hdim_multiple_of"] = SM90_HEAD_DIM_MULTIPLE
            return helper(*args, **kwargs)

        call.compile_cache = helper.compile_cache  # the helpers find their JIT cache through their module name
        return call

    for name, helper in originals.items():
        setattr(module, name, rounding_to_16(helper))
    try:
        yield
    finally:
        for name, helper in originals.items():
            setattr(module, name, helper)


def _dq_accumulator_fix(module: ModuleType, q: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """The helpers' rounding fix where FA4's SM90 backward needs it (head dims that are not multiples of 32)."""
    needed = (_on_sm90(q) and q.shape[-1] % 32 != 0
              and all(hasattr(module, name) for name in ("_bwd_preprocess", "_bwd_postprocess_convert")))
    return _sm90_dq_accumulator_rounding(module) if needed else contextlib.nullcontext()


def _loaded_module() -> ModuleType:
    module = fa4_module()
    if module is None:
        raise RuntimeError(f"FlashAttention-4 is not available ({fa4_import_error()}); {INSTALL_HINT}")
    return module


def _forward_kernel(q, k, v, scale, causal, window_left, window_right):
    result = _loaded_module()._flash_attn_fwd(
        q, k, v, softmax_scale=scale, causal=causal, window_size_left=window_left, window_size_right=window_right,
        return_lse=True)
    return result[0].contiguous(), result[1].contiguous()


_fa4_forward = torch.library.custom_op("mmtrain::fa4_forward", mutates_args=(), schema=_FORWARD_SCHEMA)(
    _forward_kernel)


@_fa4_forward.register_fake
def _fa4_forward_fake(q, k, v, scale, causal, window_left, window_right):
    batch, s_q, heads, _ = q.shape
    return q.new_empty(batch, s_q, heads, v.shape[-1]), q.new_empty(batch, heads, s_q, dtype=torch.float32)


def _backward_kernel(dout, q, k, v, out, lse, scale, causal, window_left, window_right):
    module = _loaded_module()
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    with _dq_accumulator_fix(module, q):
        module._flash_attn_bwd(
            q, k, v, out, dout, lse, softmax_scale=scale, causal=causal, window_size_left=window_left,
            window_size_right=window_right, dq=dq, dk=dk, dv=dv)
    return dq, dk, dv


_fa4_backward = torch.library.custom_op("mmtrain::fa4_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)(
    _backward_kernel)


@_fa4_backward.register_fake
def _fa4_backward_fake(dout, q, k, v, out, lse, scale, causal, window_left, window_right):
    return tuple(torch.empty_like(x) for x in (q, k, v))


def _fa4_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, scale, causal, window_left, window_right = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.options = (scale, causal, window_left, window_right)


def _backward_through(backward: Any) -> Any:
    def fa4_forward_backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dq, dk, dv = backward(dout, q, k, v, out, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None

    return fa4_forward_backward


_fa4_forward.register_autograd(_backward_through(_fa4_backward), setup_context=_fa4_setup_context)


class _EagerFA4(torch.autograd.Function):
    """The same kernels as the custom ops, outside the dispatcher, for eager mode: on an H100 host the two ops'
    Python dispatch added about 0.2 ms to FA4's kernels per forward + backward at 1k tokens (0.59 against 0.40 ms
    called directly), where the GPU work is a few tenths of a millisecond; through ``fa4_attention`` one forward +
    backward went from 1.43 to 1.35 ms. torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx: Any, q, k, v, scale, causal, window_left, window_right):  # noqa: ANN001 - the op's schema
        out, lse = _forward_kernel(q, k, v, scale, causal, window_left, window_right)
        _fa4_setup_context(ctx, (q, k, v, scale, causal, window_left, window_right), (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    backward = staticmethod(_backward_through(_backward_kernel))


def fa4_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention through FA4; differentiable, and traceable by torch.compile.

    ``causal``: query ``i`` sees keys ``j <= i + S_k - S_q`` (aligned bottom-right). ``window=(left, right)``: query
    ``i`` sees keys with ``-left <= j - i - (S_k - S_q) <= right`` (FlashAttention's sliding window).
    """
    _loaded_module()
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale  # the unpadded head dim's
    multiple = _head_dim_multiple(q)
    q4, k4 = (_padded_rows(_to_bshd(x), _padded(head_dim, multiple)) for x in (q, k))
    v4 = _padded_rows(_to_bshd(v), _padded(head_dim_v, multiple))
    left, right = (None, None) if window is None else (int(window[0]), int(window[1]))
    attend = _fa4_forward if torch.compiler.is_compiling() else _EagerFA4.apply
    out, _ = attend(q4, k4, v4, float(scale), bool(causal), left, right)
    out = out[..., :head_dim_v]
    # (batch, S_q, heads, D_v) -> the caller's (*batch, S_q, D_v)
    if q.ndim == 3:
        return out.squeeze(2)
    return out.transpose(1, 2).reshape(*q.shape[:-1], head_dim_v)


# Packed self-attention: q, k and v as three slices of one (batch, S, 3 * heads * D) projection output (fused QKV).
# FA4 reads the slices in place (its kernels take strided tensors whose last dim is contiguous) and its backward
# writes dq, dk and dv into the slices of one gradient tensor of the same layout, so the fused projection's backward
# gets its input gradient without the copy that concatenating three separate gradients would cost.
_PACKED_FORWARD_SCHEMA = ("(Tensor qkv, int num_heads, float scale, bool causal, int? window_left,"
                          " int? window_right) -> (Tensor, Tensor)")
_PACKED_BACKWARD_SCHEMA = ("(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, bool causal,"
                           " int? window_left, int? window_right) -> Tensor")


def _unpacked(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """(batch, S, 3 * heads * D) -> q, k, v views, each (batch, S, heads, D)."""
    batch, seq, width = qkv.shape
    return qkv.view(batch, seq, 3, num_heads, width // (3 * num_heads)).unbind(2)


def _packed_forward_kernel(qkv, num_heads, scale, causal, window_left, window_right):
    q, k, v = _unpacked(qkv, num_heads)
    result = _loaded_module()._flash_attn_fwd(
        q, k, v, softmax_scale=scale, causal=causal, window_size_left=window_left, window_size_right=window_right,
        return_lse=True)
    return result[0].contiguous(), result[1].contiguous()


_fa4_packed_forward = torch.library.custom_op("mmtrain::fa4_packed_forward", mutates_args=(),
                                              schema=_PACKED_FORWARD_SCHEMA)(_packed_forward_kernel)


@_fa4_packed_forward.register_fake
def _fa4_packed_forward_fake(qkv, num_heads, scale, causal, window_left, window_right):
    batch, seq, width = qkv.shape
    head_dim = width // (3 * num_heads)
    return (qkv.new_empty(batch, seq, num_heads, head_dim),
            qkv.new_empty(batch, num_heads, seq, dtype=torch.float32))


def _packed_backward_kernel(dout, qkv, out, lse, num_heads, scale, causal, window_left, window_right):
    module = _loaded_module()
    q, k, v = _unpacked(qkv, num_heads)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    dq, dk, dv = _unpacked(dqkv, num_heads)
    with _dq_accumulator_fix(module, q):
        grads = module._flash_attn_bwd(
            q, k, v, out, dout, lse, softmax_scale=scale, causal=causal, window_size_left=window_left,
            window_size_right=window_right, dq=dq, dk=dk, dv=dv)
    for written, slot in zip(grads[:3], (dq, dk, dv)):
        if written.data_ptr() != slot.data_ptr():  # a kernel that allocated its own output after all: copy it in
            slot.copy_(written)
    return dqkv


_fa4_packed_backward = torch.library.custom_op("mmtrain::fa4_packed_backward", mutates_args=(),
                                               schema=_PACKED_BACKWARD_SCHEMA)(_packed_backward_kernel)


@_fa4_packed_backward.register_fake
def _fa4_packed_backward_fake(dout, qkv, out, lse, num_heads, scale, causal, window_left, window_right):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _fa4_packed_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    qkv, num_heads, scale, causal, window_left, window_right = inputs
    ctx.save_for_backward(qkv, *output)
    ctx.options = (num_heads, scale, causal, window_left, window_right)


def _packed_backward_through(backward: Any) -> Any:
    def fa4_packed_forward_backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[Any, ...]:
        qkv, out, lse = ctx.saved_tensors
        dqkv = backward(dout.contiguous(), qkv, out, lse, *ctx.options)
        return dqkv, None, None, None, None, None

    return fa4_packed_forward_backward


_fa4_packed_forward.register_autograd(_packed_backward_through(_fa4_packed_backward),
                                      setup_context=_fa4_packed_setup_context)


class _EagerPackedFA4(torch.autograd.Function):
    """The packed custom ops' kernels outside the dispatcher, for eager mode (see ``_EagerFA4``)."""

    @staticmethod
    def forward(ctx: Any, qkv, num_heads, scale, causal, window_left, window_right):  # noqa: ANN001 - the op's schema
        out, lse = _packed_forward_kernel(qkv, num_heads, scale, causal, window_left, window_right)
        _fa4_packed_setup_context(ctx, (qkv, num_heads, scale, causal, window_left, window_right), (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    backward = staticmethod(_packed_backward_through(_packed_backward_kernel))


def fa4_packed_supported(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether ``fa4_packed_attention`` takes this ``(batch, S, 3 * heads * D)`` projection output: what
    ``fa4_supported`` asks of q, k and v, with a head dim FA4 takes as it is (no padding: the slices stay in place)."""
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        return False
    head_dim = qkv.shape[-1] // (3 * num_heads)
    q = qkv.narrow(-1, 0, head_dim)
    if not fa4_supported(q, q, q):
        return False
    return head_dim % _head_dim_multiple(qkv) == 0 and qkv.stride(-1) == 1


def fa4_packed_attention(qkv: torch.Tensor, num_heads: int, *, causal: bool = False,
                         window: tuple[int, int] | None = None, scale: float | None = None) -> torch.Tensor:
    """Self-attention through FA4 on a fused projection's output: ``qkv (batch, S, 3 * heads * D)`` holding
    ``[q | k | v]``, each ``heads * D`` wide and split into heads in order -> ``(batch, S, heads, D)``.
    ``causal`` and ``window`` as in ``fa4_attention``. Check ``fa4_packed_supported`` first."""
    _loaded_module()
    head_dim = qkv.shape[-1] // (3 * num_heads)
    scale = head_dim ** -0.5 if scale is None else scale
    left, right = (None, None) if window is None else (int(window[0]), int(window[1]))
    attend = _fa4_packed_forward if torch.compiler.is_compiling() else _EagerPackedFA4.apply
    out, _ = attend(qkv.contiguous(), int(num_heads), float(scale), bool(causal), left, right)
    return out
