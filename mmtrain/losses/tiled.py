"""Memory-tiled row reductions of a logit matrix that is never materialised.

    tiled_row_reduce(a (N, D), b (M, D), scale 0-dim, bias 0-dim | None, kind, block, positive_offset) -> (N,)
        x_ij = scale * a_i . b_j + bias; p(i) = i + positive_offset (the positive column of row i), if given
        kind="logsumexp": out_i = logsumexp_j x_ij                 (minus x_i,p(i): row i's cross-entropy)
        kind="softplus":  out_i = sum_j softplus(x_ij)             (softplus(-x_i,p(i)) at the positive: row i's
                                                                    sigmoid loss, -sum_j log sigmoid(z_ij x_ij))

Forward walks over ``b`` in blocks of ``block`` rows (online log-sum-exp); backward recomputes each block's
logits, so peak extra memory is N x block instead of N x M. Gradients flow to a, b, scale and bias.

Both passes run with autocast off in float32 (float64 when an input is float64): see ``_precision``. The positive
term is taken from the same logits as the reduction, so a confident positive (loss near 0) is not the difference
of two separately rounded numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmtrain.losses._precision import compute_dtype, no_autocast


def _block_logits(a: torch.Tensor, b_block: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    logits = (a @ b_block.t()).mul_(scale)
    if bias is not None:
        logits += bias
    return logits


def _positives(n: int, offset: int | None, start: int, width: int, device) -> tuple[torch.Tensor, ...] | None:
    """(rows, columns within the block) of the positives that fall in block [start, start + width), or None."""
    if offset is None:
        return None
    lo, hi = max(0, start - offset), min(n, start + width - offset)
    if hi <= lo:
        return None
    rows = torch.arange(lo, hi, device=device)
    return rows, rows + (offset - start)


class _TiledRowReduce(torch.autograd.Function):
    # Each loop body works on at most two (N, block) buffers, in place where it can, and drops them before the next
    # block is computed: the peak is about 2 x N x block elements, not one buffer per elementwise step.
    @staticmethod
    def forward(ctx, a, b, scale, bias, kind: str, block: int, offset: int | None):  # type: ignore[override]
        n, dtype = a.shape[0], a.dtype
        with no_autocast(a.device):
            if kind == "logsumexp":
                running_max = torch.full((n,), float("-inf"), dtype=dtype, device=a.device)
                running_sum = torch.zeros((n,), dtype=dtype, device=a.device)
                positive = torch.zeros((n,), dtype=dtype, device=a.device)
                for start in range(0, b.shape[0], block):
                    logits = _block_logits(a, b[start:start + block], scale, bias)
                    pos = _positives(n, offset, start, logits.shape[1], a.device)
                    if pos is not None:
                        positive[pos[0]] = logits[pos]
                    new_max = torch.maximum(running_max, logits.amax(dim=1))
                    block_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)
                    del logits
                    running_sum = running_sum * torch.exp(running_max - new_max) + block_sum
                    running_max = new_max
                log_sum = torch.log(running_sum)
                # (max - x_pos) + log(sum) rather than lse - x_pos: when the positive is the row maximum, the first
                # term is exactly 0 and the loss keeps its relative precision however small it is
                out = (running_max - positive) + log_sum if offset is not None else running_max + log_sum
                saved = (running_max, log_sum)
            elif kind == "softplus":
                out = torch.zeros((n,), dtype=dtype, device=a.device)
                for start in range(0, b.shape[0], block):
                    logits = _block_logits(a, b[start:start + block], scale, bias)
                    pos = _positives(n, offset, start, logits.shape[1], a.device)
                    if pos is not None:
                        logits[pos] = -logits[pos]  # label +1: softplus(-x) = -log sigmoid(x)
                    out += F.softplus(logits).sum(dim=1)
                    del logits
                saved = ()
            else:
                raise ValueError(f"kind must be 'logsumexp' or 'softplus', got {kind!r}")
        ctx.save_for_backward(a, b, scale, bias if bias is not None else torch.empty(0), *saved)
        ctx.kind, ctx.block, ctx.has_bias, ctx.offset = kind, block, bias is not None, offset
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        a, b, scale, bias, *saved = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        n, dtype = a.shape[0], a.dtype
        with no_autocast(a.device):
            grad_a = torch.zeros_like(a)
            grad_b = torch.zeros_like(b)
            grad_scale = torch.zeros((), dtype=dtype, device=a.device)
            grad_bias = torch.zeros((), dtype=dtype, device=a.device)
            g = grad_out.to(dtype)[:, None]
            for start in range(0, b.shape[0], ctx.block):
                b_block = b[start:start + ctx.block]
                raw = a @ b_block.t()  # a_i . b_j
                d_logits = raw * scale
                if bias is not None:
                    d_logits += bias
                pos = _positives(n, ctx.offset, start, raw.shape[1], a.device)
                if ctx.kind == "logsumexp":
                    running_max, log_sum = saved
                    d_logits.sub_(running_max[:, None]).sub_(log_sum[:, None])  # log softmax, as in forward
                    shifted_pos = d_logits[pos] if pos is not None else None
                    d_logits.exp_()  # softmax weights
                    if pos is not None:
                        d_logits[pos] = torch.expm1(shifted_pos)  # p - 1 without cancellation
                else:
                    if pos is not None:
                        d_logits[pos] = -d_logits[pos]
                    d_logits.sigmoid_()  # d softplus / d logit
                    if pos is not None:
                        d_logits[pos] = -d_logits[pos]  # d softplus(-x) / dx = -sigmoid(-x)
                d_logits.mul_(g)
                grad_bias += d_logits.sum()
                grad_scale += raw.mul_(d_logits).sum()  # raw is not needed after this
                del raw
                d_raw = d_logits.mul_(scale)
                grad_a.addmm_(d_raw, b_block)
                torch.mm(d_raw.t(), a, out=grad_b[start:start + ctx.block])
                del d_logits, d_raw
        return (grad_a, grad_b, grad_scale, grad_bias if bias is not None else None, None, None, None)


def tiled_row_reduce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | float | None,
                     kind: str, block: int = 1024, positive_offset: int | None = None) -> torch.Tensor:
    """See the module docstring. (N, D), (M, D) -> (N,) float32 (float64 when an input is float64).

    Inputs of other dtypes (bf16 leaves, autocast outputs) are upcast here; their gradients come back in their own
    dtype. ``positive_offset`` needs ``0 <= positive_offset`` and ``positive_offset + N <= M``.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if positive_offset is not None and not 0 <= positive_offset <= b.shape[0] - a.shape[0]:
        raise ValueError(f"positive_offset {positive_offset} puts positives outside the {b.shape[0]} columns "
                         f"for {a.shape[0]} rows")
    scale = torch.as_tensor(scale, device=a.device)
    bias = None if bias is None else torch.as_tensor(bias, device=a.device)
    dtype = compute_dtype(a, b, scale, bias)
    with no_autocast(a.device):
        a, b, scale = a.to(dtype), b.to(dtype), scale.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _TiledRowReduce.apply(a, b, scale, bias, kind, int(block), positive_offset)
