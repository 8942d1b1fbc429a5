"""Differentiable collectives for contrastive losses across ranks.

    all_gather_with_grad(x (B, D)) -> (world * B, D)       rank r's rows at [r*B:(r+1)*B]; backward sums the
                                                            gradient over ranks and returns this rank's slice
    neighbour_exchange_with_grad(x (B, D)) -> (B, D)        receives the left neighbour's x, sends this x to the
                                                            right neighbour; gradients travel the other way

Every rank must pass the same local batch size. Without an initialised process group of size > 1 these are the
identity / no-ops, so single-process code calls them unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info(group=None) -> tuple[int, int]:
    """(rank, world size) of ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.local = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty((ctx.local, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return out, None
        # gloo has no reduce-scatter: sum the full gradient, keep our rows
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.local:(ctx.rank + 1) * ctx.local], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...), differentiable."""
    _, world = world_info(group)
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


def _exchange(x: torch.Tensor, send_to: int, recv_from: int, group) -> torch.Tensor:
    received = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), send_to, group),
           dist.P2POp(dist.irecv, received, recv_from, group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, left: int, right: int, group) -> torch.Tensor:  # type: ignore[override]
        ctx.left, ctx.right, ctx.group = left, right, group
        return _exchange(x, send_to=right, recv_from=left, group=group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _exchange(grad, send_to=ctx.left, recv_from=ctx.right, group=ctx.group), None, None, None


def neighbour_exchange_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Ring step: returns the left neighbour's ``x``; this rank's ``x`` goes to the right neighbour."""
    rank, world = world_info(group)
    if world == 1:
        return x
    # P2P ops take global ranks
    left = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    right = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    return _NeighbourExchange.apply(x, left, right, group)
