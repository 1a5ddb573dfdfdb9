"""Differentiable collectives of the distributed losses: identity-like forwards,
chosen backwards (open_clip's gather_with_grad semantics), and the group sums
over ranks of the grouped contrastive loss (a ring, its own adjoint)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmkernels.distributed._ring import Ring, Slots


def _summed(x: Tensor, ring: Ring) -> Tensor:
    """A copy of ``x`` summed over the ranks (an all_reduce), outside autograd."""
    total = x.detach().clone()
    dist.all_reduce(total, group=ring.group)
    return total


class LossOverRanks(torch.autograd.Function):
    """Sum of the ranks' shares of the loss (an all_reduce). Backward: this rank's
    share receives the upstream gradient times ``multiplier`` (W for open_clip's
    gather_with_grad semantics, 1 without); no communication."""

    @staticmethod
    def forward(ctx, share: Tensor, ring: Ring, multiplier: float):
        ctx.multiplier = multiplier
        return _summed(share, ring)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.multiplier, None, None


class SharedScalar(torch.autograd.Function):
    """logit_scale as every rank's share of the loss sees it. Backward: the shares'
    gradients summed over ranks (an all_reduce), divided by ``divisor`` (the
    multiplier of LossOverRanks), so each rank gets dL/dscale."""

    @staticmethod
    def forward(ctx, scale: Tensor, ring: Ring, divisor: float):
        ctx.ring, ctx.divisor = ring, divisor
        return scale.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return _summed(grad, ctx.ring) / ctx.divisor, None, None


def gather_rows(x: Tensor, ring: Ring) -> Tensor:
    """All ranks' rows of ``x`` concatenated in rank order (uneven sizes padded for
    the collective), not differentiable."""
    largest = max(ring.sizes)
    padded = x.new_zeros(largest, x.shape[1])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(ring.size)]
    dist.all_gather(parts, padded.contiguous(), group=ring.group)
    return torch.cat([part[:rows] for part, rows in zip(parts, ring.sizes)])


def summed_own_rows(whole: Tensor, ring: Ring) -> Tensor:
    """This rank's rows of ``whole`` (all ranks' rows in rank order, as gather_rows
    returns them) summed over the ranks, not differentiable: gather_rows' adjoint."""
    largest = max(ring.sizes)
    padded = whole.new_zeros(ring.size, largest, whole.shape[1])
    start = 0
    for q, rows in enumerate(ring.sizes):
        padded[q, :rows] = whole[start:start + rows]
        start += rows
    if dist.get_backend(ring.group) == "nccl":
        mine = whole.new_empty(largest, whole.shape[1])
        dist.reduce_scatter_tensor(mine, padded.view(-1, whole.shape[1]), group=ring.group)
    else:  # gloo has no reduce_scatter
        dist.all_reduce(padded, group=ring.group)
        mine = padded[ring.rank]
    return mine[: ring.sizes[ring.rank]].contiguous()


def _collective(collective, adjoint):
    """An autograd.Function whose forward is ``collective(x, ring)`` and
    whose backward is its adjoint ``adjoint(grad, ring)``."""

    class Collective(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor, ring: Ring):
            ctx.ring = ring
            return collective(x, ring)

        @staticmethod
        def backward(ctx, grad):
            return adjoint(grad, ctx.ring), None

    return Collective


class SumOverRanks(_collective(_summed, _summed)):
    """A tensor summed over ranks; the backward sums the gradients over ranks too
    (every rank's share depends on every rank's part)."""


class AllGather(_collective(gather_rows, summed_own_rows)):
    """All ranks' rows, concatenated; the backward sums each rank's gradient of the
    whole over ranks and returns this rank's rows (open_clip's gather_with_grad)."""


def _matching_sums(block: Tensor, block_ids: Tensor, home_ids: Tensor) -> Tensor:
    """Row i: the sum of the rows of ``block`` whose id equals ``home_ids[i]`` (0 where
    none does). The block's rows are summed per id after a sort (renumbered 0, 1, ...
    in order of value), and each home id finds its group by a binary search: memory
    O((rows of block + home rows) * D), no home x block comparison."""
    values, order = torch.sort(block_ids)
    first = torch.ones_like(values, dtype=torch.bool)  # where a new id starts, in sorted order
    first[1:] = values[1:] != values[:-1]
    group = first.cumsum(0) - 1  # the group of each sorted row
    totals = block.new_zeros(block.shape).index_add_(0, group, block[order])
    at = torch.searchsorted(values, home_ids).clamp_max(values.shape[0] - 1)
    found = (values[at] == home_ids).unsqueeze(1)
    return torch.where(found, totals[group[at]], 0.0)


def group_sums(x: Tensor, home_ids: Tensor, ids: Tensor, ring: Ring) -> Tensor:
    """Row i of this rank: the sum of ``x`` over the rows of every rank whose id (``ids``,
    (N,), all ranks' in rank order) equals ``home_ids[i]``, not differentiable. Every
    rank's ``x`` goes once round the ring (the next block sent while the current one
    is summed), so a rank holds two blocks and its (n, D) result, whatever W."""
    d = x.shape[1]
    out = torch.zeros_like(x)
    block, blocks = x.contiguous(), Slots(2, max(ring.sizes) * d, x)
    for step in range(ring.size):
        v = ring.visiting(step)
        sends, receives, incoming = [], [], None
        if step < ring.size - 1:  # send this block on, receive the next
            incoming = blocks.take(step, ring.sizes[ring.visiting(step + 1)], d)
            sends, receives = [(block, 1)], [(incoming, -1)]
        pending = ring.start(sends, receives)
        start = sum(ring.sizes[:v])
        out += _matching_sums(block, ids[start:start + ring.sizes[v]], home_ids)
        pending.wait()
        block = incoming
    return out


class GroupSumOverRanks(torch.autograd.Function):
    """:func:`group_sums` of ``x``. Its matrix ``[id_i == id_j]`` over the global rows is
    symmetric, so the backward is the same ring on the upstream gradient (each rank's
    rows collect the gradients of every rank's rows of their group)."""

    @staticmethod
    def forward(ctx, x: Tensor, home_ids: Tensor, ids: Tensor, ring: Ring):
        ctx.save_for_backward(home_ids, ids)
        ctx.ring = ring
        return group_sums(x, home_ids, ids, ring)

    @staticmethod
    def backward(ctx, grad):
        home_ids, ids = ctx.saved_tensors
        return group_sums(grad.contiguous(), home_ids, ids, ctx.ring), None, None, None
