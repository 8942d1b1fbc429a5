"""Memory-tiled row reductions of a logit matrix that is never materialised.

    tiled_row_reduce(a (N, D), b (M, D), scale 0-dim, bias 0-dim | None, kind, block) -> (N,)
        kind="logsumexp": out_i = logsumexp_j (scale * a_i . b_j + bias)
        kind="softplus":  out_i = sum_j softplus(scale * a_i . b_j + bias)

Forward walks over ``b`` in blocks of ``block`` rows (online log-sum-exp); backward recomputes each block's
logits, so peak extra memory is N x block instead of N x M. Gradients flow to a, b, scale and bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _block_logits(a: torch.Tensor, b_block: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    logits = (a @ b_block.t()).float() * scale.float()
    if bias is not None:
        logits = logits + bias.float()
    return logits


class _TiledRowReduce(torch.autograd.Function):
    # Each loop body works on at most two (N, block) float32 buffers, in place where it can, and drops them before
    # the next block is computed: the peak is about 2 x N x block x 4 bytes, not one buffer per elementwise step.
    @staticmethod
    def forward(ctx, a, b, scale, bias, kind: str, block: int):  # type: ignore[override]
        n = a.shape[0]
        if kind == "logsumexp":
            running_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=a.device)
            running_sum = torch.zeros((n,), dtype=torch.float32, device=a.device)
            for start in range(0, b.shape[0], block):
                logits = _block_logits(a, b[start:start + block], scale, bias)
                new_max = torch.maximum(running_max, logits.amax(dim=1))
                block_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)
                del logits
                running_sum = running_sum * torch.exp(running_max - new_max) + block_sum
                running_max = new_max
            out = running_max + torch.log(running_sum)
        elif kind == "softplus":
            out = torch.zeros((n,), dtype=torch.float32, device=a.device)
            for start in range(0, b.shape[0], block):
                logits = _block_logits(a, b[start:start + block], scale, bias)
                out += F.softplus(logits).sum(dim=1)
                del logits
        else:
            raise ValueError(f"kind must be 'logsumexp' or 'softplus', got {kind!r}")
        ctx.save_for_backward(a, b, scale, bias if bias is not None else torch.empty(0), out)
        ctx.kind, ctx.block, ctx.has_bias = kind, block, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        a, b, scale, bias, out = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        grad_a = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
        grad_scale = torch.zeros((), dtype=torch.float32, device=a.device)
        grad_bias = torch.zeros((), dtype=torch.float32, device=a.device)
        a32, g, scale32 = a.float(), grad_out.float()[:, None], scale.float()
        for start in range(0, b.shape[0], ctx.block):
            b_block = b[start:start + ctx.block]
            raw = (a @ b_block.t()).float()  # a_i . b_j
            d_logits = raw * scale32
            if bias is not None:
                d_logits += bias.float()
            if ctx.kind == "logsumexp":
                d_logits.sub_(out[:, None]).exp_()  # softmax weights
            else:
                d_logits.sigmoid_()  # d softplus / d logit
            d_logits.mul_(g)
            grad_bias += d_logits.sum()
            grad_scale += raw.mul_(d_logits).sum()  # raw is not needed after this
            del raw
            d_raw = d_logits.mul_(scale32)
            grad_a.addmm_(d_raw, b_block.float())
            torch.mm(d_raw.t(), a32, out=grad_b[start:start + ctx.block])
            del d_logits, d_raw
        return (grad_a.to(a.dtype), grad_b.to(b.dtype), grad_scale.to(scale.dtype),
                grad_bias.to(bias.dtype) if bias is not None else None, None, None)


def tiled_row_reduce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     kind: str, block: int = 1024) -> torch.Tensor:
    """See the module docstring. (N, D), (M, D) -> (N,) float32."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=a.device)
    if bias is not None:
        bias = torch.as_tensor(bias, dtype=torch.float32, device=a.device)
    return _TiledRowReduce.apply(a, b, scale, bias, kind, block)
