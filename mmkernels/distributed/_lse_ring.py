r"""The ring of the logsumexp primitive (masked or not): one autograd node per matrix.

The CLIP loss (clip.py) and the embedding loss (embedding.py) both need, for
this rank's rows ``a``, the row logsumexp against the blocks ``b`` of every
rank and, often, the column logsumexp of this rank's ``b`` against every rank's
rows. :class:`RingLogSumExp` computes both by one schedule:

Forward. The blocks travel round the ring of ranks, one hop per step, point to
point (``batch_isend_irecv``), while ``a`` stays home. At step k rank r holds
the block of rank v = r - k (mod W) and runs the forward kernel on
``(a, block)`` once: the row statistics stay home and merge exactly by
``logaddexp``; the column statistics travel with the block and merge at each
hop. The next block is sent while the current one is computed on; the column
statistics, which can leave only once computed, follow their block one step
behind (the receiver computes its own contribution first and merges the
incoming partial afterwards, so no rank waits for a message it could have
overlapped with work). After W steps one more hop brings each block's column
statistics home.

Backward. The same with the backward kernel: the block travels with its
complete column statistics and upstream column gradients; ``pb`` (the products
for the home rows) accumulates at home, and ``pa`` (the products for the
visiting rows) accumulates in a buffer that travels one step behind its block
and comes home complete after a lap. The shared epilogue
(mmkernels/ops/_common.py) turns pb and pa into gradients. A frozen side costs
no product.

The kernels and the rules: ``kernels`` is a (fwd, bwd) pair and ``rules_at(v)``
the tuple of extra arguments the kernels take for the block of rank v: ``()``
for the unmasked primitive (``_kernels.ring_kernels("logsumexp", ...)``), the
masked primitive's six (exclude_diagonal, positives, row_groups, col_groups,
row_threshold, col_threshold; ops/masked_logsumexp.py) for its kernels, in the
block's local indices. Per rank at any time: the local inputs, two visiting
blocks, one accumulator and a tile, whatever W.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mmkernels import _checks
from mmkernels.distributed._ring import Ring, Slots
from mmkernels.ops import _common


def _ring_forward(a, b, scale, normalize, ring: Ring, rows, rules_at, fwd, columns: bool):
    """(row_lse, col_lse) of the home rows ``a`` against every rank's ``b`` (rank q's
    has ``rows[q]`` rows), the rules of the block of rank v being ``rules_at(v)``;
    col_lse (of this rank's own ``b``, collected round the ring) only when ``columns``."""
    d = a.shape[1]
    block = b.contiguous()  # the visiting block (this rank's own at step 0); sent as is
    blocks = Slots(2, max(rows) * d, b)
    row_lse = col_done = None
    for step in range(ring.size):
        v = ring.visiting(step)
        sends, receives, incoming, col_in = [], [], None, None
        if step < ring.size - 1:  # send this block on, receive the next
            incoming = blocks.take(step, rows[ring.visiting(step + 1)], d)
            sends.append((block, 1))
            receives.append((incoming, -1))
        if columns and step > 0:  # the block's column statistics follow it, one step behind
            col_in = a.new_empty(rows[v], dtype=_checks.compute_dtype(a.dtype))
            sends.append((col_done, 1))
            receives.append((col_in, -1))
        pending = ring.start(sends, receives)
        row_k, col_k = fwd(a, block, scale, normalize, *rules_at(v))
        pending.wait()
        row_lse = row_k if row_lse is None else torch.logaddexp(row_lse, row_k)
        if columns:
            col_done = col_k if col_in is None else torch.logaddexp(col_k, col_in)
        block = incoming
    if not columns or ring.size == 1:
        return row_lse, col_done
    # col_done is complete for the block of rank + 1: one more hop takes it home.
    (col_lse,) = ring.start([(col_done, 1)], [(col_done.new_empty(b.shape[0]), -1)]).wait()
    return row_lse, col_lse


def _ring_backward(a, b, scale, normalize, row_lse, col_lse, g_row, g_col, ring: Ring, rows,
                   rules_at, bwd, needs_input_grad, b_trains: bool):
    """Gradients of (a, b, scale's share) by the ring: pb stays home, pa travels (only
    when some rank's ``b`` trains: ``b_trains``; pb only when this rank's ``a`` trains
    or the scale's share is taken from it). ``col_lse`` None: no column term."""
    needs_a, _, needs_scale = needs_input_grad
    compute_pa = b_trains
    compute_pb = needs_a or (needs_scale and not compute_pa)
    columns = col_lse is not None
    d, largest = a.shape[1], max(rows)
    block = b.contiguous()
    stats = torch.stack([col_lse, g_col]) if columns else None
    blocks, block_stats = Slots(2, largest * d, b), Slots(2, 2 * largest, row_lse)
    accumulators = Slots(1, largest * d, row_lse)  # emptied (added to pa_k) within its step
    no_column = None
    if not columns:  # col_lse = +inf and g_col = 0 give exp(S - inf) * 0 = 0 on every kernel
        no_column = torch.stack([row_lse.new_full((largest,), float("inf")),
                                 row_lse.new_zeros(largest)])
    pb = acc = None
    for step in range(ring.size):
        v = ring.visiting(step)
        sends, receives, incoming, incoming_stats, acc_in = [], [], None, None, None
        if step < ring.size - 1:
            next_rows = rows[ring.visiting(step + 1)]
            incoming = blocks.take(step, next_rows, d)
            sends.append((block, 1))
            receives.append((incoming, -1))
            if columns:
                incoming_stats = block_stats.take(step, 2, next_rows)
                sends.append((stats, 1))
                receives.append((incoming_stats, -1))
        if step > 0 and compute_pa:  # the previous block's accumulator follows it
            acc_in = accumulators.take(step, rows[v], d)
            sends.append((acc, 1))
            receives.append((acc_in, -1))
        pending = ring.start(sends, receives)
        c_lse, c_grad = (stats[0], stats[1]) if columns else (no_column[0, :rows[v]],
                                                              no_column[1, :rows[v]])
        pb_k, pa_k = bwd(a, block, scale, normalize, *rules_at(v), row_lse, c_lse, g_row, c_grad,
                         compute_pb, compute_pa)
        pending.wait()
        pb, acc = add_step_products(pb, pb_k, acc, pa_k, acc_in, compute_pb, compute_pa)
        block, stats = incoming, incoming_stats

    if ring.size == 1:
        return _common.grads_from_products(a, b, scale, normalize, pb, acc, needs_input_grad)
    return finish_ring_backward(a, b, scale, normalize, ring, pb, acc, needs_input_grad,
                                compute_pb, compute_pa)


def add_step_products(pb, pb_k, acc, pa_k, acc_in, compute_pb: bool, compute_pa: bool):
    """One ring step's products folded in: pb (the home rows', None before the first
    step) += pb_k; the travelling accumulator becomes pa_k + the one received (acc_in,
    None at the first step). A product not computed (a frozen side) leaves its side as is."""
    if compute_pb:
        pb = pb_k if pb is None else pb.add_(pb_k)
    if compute_pa:
        acc = pa_k.contiguous() if acc_in is None else pa_k.add_(acc_in)
    return pb, acc


def finish_ring_backward(a, b, scale, normalize, ring: Ring, pb, acc, needs_input_grad,
                         compute_pb: bool, compute_pa: bool):
    """The gradients of (a, b, scale) once the ring's steps are done: ``pb`` holds this
    rank's rows' product, ``acc`` the travelling pa of the block of rank + 1, complete:
    it is sent home while the home rows' gradients are formed, and ours received.

    The scale's share comes from pa whenever pa is computed (``compute_pa``, the same on
    every rank), else from pb: the shares, summed over ranks, then cover every entry of
    S once even where ``a`` trains on some ranks only (a per-rank choice would count
    some entries twice and others never)."""
    needs_a, needs_b, needs_scale = needs_input_grad
    d = a.shape[1]
    pending = ring.start([(acc, 1)], [(acc.new_empty(b.shape[0], d), -1)]) if compute_pa else None
    grad_a, _, scale_from_pb = _common.grads_from_products(
        a, b, scale, normalize, pb, None, (needs_a, False, needs_scale and not compute_pa))
    pa = pending.wait()[0] if compute_pa else None
    _, grad_b, scale_from_pa = _common.grads_from_products(
        a, b, scale, normalize, None, pa, (False, needs_b, needs_scale and compute_pa))
    return grad_a, grad_b, scale_from_pa if compute_pa else scale_from_pb


class RingLogSumExp(torch.autograd.Function):
    """(row_lse, col_lse) of the home rows ``a`` against the blocks ``b`` of every rank
    (rank q's has ``rows[q]`` rows), by ``kernels`` under the rules ``rules_at(v)`` of
    each visiting rank v (module docstring); col_lse (this rank's ``b`` against every
    rank's ``a``) only with ``columns``, else an empty tensor. ``b_trains``: some
    rank's ``b`` requires grad (else no rank computes the visiting side's products).

    Backward: given this rank's upstream gradients of its statistics, the gradients
    of its ``a`` and ``b`` collect the contributions of every rank's rows (the ring);
    the scale's gradient is this rank's share."""

    @staticmethod
    def forward(ctx, a, b, scale, normalize, ring, rows, rules_at, kernels, columns, b_trains):
        fwd, bwd = kernels
        row_lse, col_lse = _ring_forward(a, b, scale, normalize, ring, rows, rules_at, fwd,
                                         columns)
        ctx.save_for_backward(a, b, scale, row_lse, *(() if col_lse is None else (col_lse,)))
        ctx.normalize, ctx.ring, ctx.rows, ctx.rules_at = normalize, ring, rows, rules_at
        ctx.bwd, ctx.b_trains = bwd, b_trains
        return row_lse, (row_lse.new_empty(0) if col_lse is None else col_lse)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_row, g_col):
        a, b, scale, row_lse, *col = ctx.saved_tensors
        col_lse = col[0] if col else None
        g_row = torch.zeros_like(row_lse) if g_row is None else g_row.contiguous()
        if col_lse is not None:
            g_col = torch.zeros_like(col_lse) if g_col is None else g_col.contiguous()
        grads = _ring_backward(a, b, scale, ctx.normalize, row_lse, col_lse, g_row, g_col,
                               ctx.ring, ctx.rows, ctx.rules_at, ctx.bwd,
                               ctx.needs_input_grad[:3], ctx.b_trains)
        return (*grads, None, None, None, None, None, None, None)


def no_rules(v: int) -> tuple:
    """The rules of every block for the unmasked primitive's kernels: none."""
    return ()
