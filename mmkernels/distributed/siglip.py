r"""SigLIP's sigmoid loss over torch.distributed: a ring exchange, O(local_N * D) per rank.

Maths
-----
Rank r holds images ``a_r`` and texts ``t_r`` (n rows each, the same n on
every rank). Its loss, as in open_clip's ``SigLipLoss(rank, world_size)``,
covers its own image rows against every text of the global batch::

    loss_r = ( row(a_r, t_r, positives on the diagonal)
             + sum_{s != r} row(a_r, t_s, all negative) ) summed, / n

(``row`` is the per-row loss of mmkernels/ops/siglip.py), and its gradients
are those of open_clip's autograd through the exchange: ``d loss_r / d a_r``
for the images, ``d (sum_s loss_s) / d t_r`` for the texts (every rank's
loss reaches this rank's texts), ``d loss_r / d scale`` and ``d loss_r / d
bias`` for the two scalars. DDP's averaging of those then gives the
gradient of the global loss, exactly as with open_clip.

Ring
----
open_clip's autograd keeps every received text block, and its graph, alive
until the backward: O(world_size * n * D) per rank. Here one autograd node
(:class:`_SigLipRing`) saves only the local inputs:

- forward: the text blocks travel around the ring; each rank runs the
  forward kernel on each block as it passes (the next block is already in
  flight while the current one is computed) and keeps only the (n,) row sums;
- backward: the text blocks travel the same way again, each with an
  accumulator of its gradient (``pa = P.T @ Ah`` of each rank it visits);
  after its last hop the accumulator is sent straight back to the block's
  owner. The image gradient (``pb``) and the scalars' gradients stay local.

Per rank, at any time: the local inputs, two blocks in flight per direction
and their accumulators: O(n * D), whatever the world size. The price is
communication: the backward sends each block again, with its fp32
accumulator (open_clip's backward sends only the gradients).

``exchange="bidir"`` (open_clip's default) sends the blocks both ways round
the ring, (world_size - 1) / 2 rounds of two blocks; ``"shift"`` one way,
world_size - 1 rounds of one block. Both give the same values and gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmkernels import _checks
from mmkernels.distributed._kernels import ring_kernels
from mmkernels.distributed._ring import Pending, Ring
from mmkernels.ops import _common
from mmkernels.ops import siglip as _siglip

EXCHANGES = ("bidir", "shift")

RIGHT, LEFT = 1, -1  # the direction a text block travels: to rank + 1, or to rank - 1


def ring_rounds(world_size: int, exchange: str) -> list[tuple[int, ...]]:
    """The directions that move a block in each round: every other rank's block
    reaches every rank exactly once (open_clip's schedules)."""
    if exchange == "shift":
        return [(RIGHT,)] * (world_size - 1)
    both_ways, one_more = divmod(world_size - 1, 2)
    return [(RIGHT, LEFT)] * both_ways + [(RIGHT,)] * one_more


def _pass_on(ring: Ring, blocks: dict[int, Tensor], directions) -> Pending:
    """Send each direction's block one hop along, receive the next one from the other side."""
    return ring.start([(blocks[d], d) for d in directions],
                      [(torch.empty_like(blocks[d]), -d) for d in directions])


class _SigLipRing(torch.autograd.Function):
    """Per-row losses of this rank's images against the global batch's texts."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, normalize, fwd, bwd, ring, rounds):
        ctx.save_for_backward(a, b, scale, bias)
        ctx.normalize, ctx.bwd, ctx.ring, ctx.rounds = normalize, bwd, ring, rounds
        b = b.detach()
        held = {d: b for d in (RIGHT, LEFT)}  # the block each direction will pass on next
        pending = _pass_on(ring, held, rounds[0]) if rounds else None
        row = fwd(a, b, scale, bias, normalize, True)  # while the first blocks travel
        for k, directions in enumerate(rounds):
            held.update(zip(directions, pending.wait()))
            if k + 1 < len(rounds):
                pending = _pass_on(ring, held, rounds[k + 1])
            for d in directions:
                row = row + fwd(a, held[d], scale, bias, normalize, False)
        return row

    @staticmethod
    def backward(ctx, g_row):
        a, b, scale, bias = ctx.saved_tensors
        normalize, bwd, ring, rounds = ctx.normalize, ctx.bwd, ctx.ring, ctx.rounds
        g_row = g_row.contiguous()
        held = {d: b for d in (RIGHT, LEFT)}
        pending_blocks = _pass_on(ring, held, rounds[0]) if rounds else None
        pb, pa, p_row = bwd(a, b, scale, bias, normalize, True, g_row)
        accumulators: dict[int, Tensor] = {}
        pending_sums = None  # (directions, accumulators on their way to the next rank)
        returns = []  # accumulators on their way back to their owners
        for k, directions in enumerate(rounds):
            held.update(zip(directions, pending_blocks.wait()))
            if k + 1 < len(rounds):  # blocks never change: send them on at once
                pending_blocks = _pass_on(ring, held, rounds[k + 1])
            if pending_sums is not None:
                arriving, pending = pending_sums
                accumulators.update(zip(arriving, pending.wait()))
            for d in directions:
                pb_k, pa_k, p_row_k = bwd(a, held[d], scale, bias, normalize, False, g_row)
                pb += pb_k
                p_row += p_row_k
                accumulators[d] = pa_k if k == 0 else accumulators[d].add_(pa_k)
            going_on = [d for d in directions if k + 1 < len(rounds) and d in rounds[k + 1]]
            pending_sums = (going_on, _pass_on(ring, accumulators, going_on)) if going_on else None
            # A block that has made its last hop, k + 1 places from its owner, goes home;
            # this rank's own block comes home from k + 1 places the other way.
            for d in directions:
                if d not in going_on:
                    returns.append(ring.start([(accumulators.pop(d), -d * (k + 1))],
                                              [(torch.empty_like(pa), d * (k + 1))]))
        for pending in returns:
            (pa_visits,) = pending.wait()
            pa += pa_visits
        grad_a, grad_b, grad_scale = _common.grads_from_products(
            a, b, scale, normalize, pb, pa, ctx.needs_input_grad)
        grad_bias = p_row.sum() if ctx.needs_input_grad[3] else None
        return grad_a, grad_b, grad_scale, grad_bias, None, None, None, None, None


@_checks.outside_autocast
def siglip_loss_distributed(image_features: Tensor, text_features: Tensor, logit_scale=1.0,
                            logit_bias=0.0, *, group=None, exchange: str = "bidir",
                            normalize: bool = False, reduction: str = "mean",
                            backend: str = "auto") -> Tensor:
    """This rank's SigLIP loss against the texts of every rank, by ring exchange.

    Every rank of ``group`` (default: the whole world) calls it with its own
    (n, D) shard; n, D, dtype and device must be the same on every rank. The
    value is this rank's loss of open_clip's ``SigLipLoss(rank=r,
    world_size=W)``: its image rows against the global batch's texts,
    positives on the local diagonal, the total divided by the local n
    ("mean"); the gradients are open_clip's (see the module docstring).

    Args:
        image_features, text_features: this rank's (n, D) shards.
        logit_scale, logit_bias, normalize, reduction, backend: as in
            :func:`mmkernels.siglip_loss`; "none" returns the (n,) per-row
            losses of the local image rows.
        group: the torch.distributed process group (None: the default group).
        exchange: "bidir" (both ways round the ring) or "shift" (one way).

    Returns:
        fp32 loss (fp64 for fp64 inputs); gradients in the input dtype.
        Memory per rank is O(n * D) whatever the world size.
    """
    name, scale, bias = _siglip.check_inputs(image_features, text_features, logit_scale,
                                             logit_bias, reduction, backend)
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange: expected one of {EXCHANGES}, got {exchange!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("siglip_loss_distributed: torch.distributed is not initialized; "
                           "call torch.distributed.init_process_group first")
    fwd, bwd = ring_kernels("siglip", name, image_features.device)
    ring = Ring.of(group)
    per_row = _SigLipRing.apply(image_features, text_features, scale, bias, normalize, fwd, bwd,
                                ring, ring_rounds(ring.size, exchange))
    return _siglip._reduce(per_row, reduction)
