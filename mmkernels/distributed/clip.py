r"""The contrastive loss of a global batch spread over torch.distributed ranks.

Each of the W ranks of a process group holds a shard: image features ``a_r``
and text features ``b_r``, ``n_r`` rows each (shards may differ in size). The
global batch is their concatenation in rank order, N = sum_r n_r rows, and the
loss is the symmetric CLIP loss of that batch (mmkernels/ops/contrastive.py)::

    S = scale * Ah @ Bh.T                                  (N, N), never formed
    L = 1/N * sum_i [ (row_lse_i + col_lse_i) / 2 - positive and smoothing terms ]

The terms of pair i need pair i's own features (held by one rank), the row
logsumexp of image i over all texts and the column logsumexp of text i over
all images, and, for label smoothing, the sums of all image and all text
features (two D-vectors, all-reduced). The two statistics of the local rows
are all that the strategies below compute; the rest is O(n_r * D) autograd,
as on one process.

Strategies
----------
``ring`` (memory O(n_r * D) per rank). The text shards travel round the ring
of ranks, one hop per step, point to point (``batch_isend_irecv``), while the
image shards stay home. At step k rank r holds the visiting block
``b_v``, v = r - k (mod W), and runs the tiled primitive on ``(a_r, b_v)``
once, which yields both the row statistics of its images against that block
(they stay home and merge exactly by ``logaddexp``) and the column statistics
of the block against its images (they travel with the block and merge at each
hop). After W steps the row statistics are complete; one more hop brings each
block's complete column statistics home. The next block is sent while the
current one is computed on, and the column statistics, which can only leave
once computed, travel one step behind their block: the receiver computes its
own contribution first and merges the incoming partial afterwards, so no rank
waits for a message it could have overlapped with work.

The backward does the same with the primitive's backward kernel: the block
travels with its (complete) column statistics and upstream column gradients;
``pb`` (the products for the home rows) accumulates at home, and ``pa`` (the
products for the visiting block's rows) accumulates in a buffer that travels
one step behind its block and comes home complete after a full lap. The
shared epilogue (mmkernels/ops/_common.py) turns the home rows' pb and pa into
gradients. Per rank: a few (n, D) buffers and a tile, whatever W.

``gather`` (memory O(N * D) per rank). Both feature matrices are all-gathered
with gradient, and each rank runs the single-process tiled primitive for its
own rows: ``a_r`` against all texts (row statistics) and ``b_r`` against all
images (column statistics), i.e. 2 * n_r * N * D multiply-adds per rank
against the ring's n_r * N * D, with no overlap; simpler, and the choice for
the naive (materializing) backend, which has no kernels a ring could use.

Gradients
---------
Every rank returns the same global loss L. The gradients follow open_clip's
``ClipLoss(gather_with_grad=True)``, where every rank computes L from
all-gathered features and the all-gather's backward sums over ranks: each
rank's feature gradient is ``W * dL/d(local features)`` and ``logit_scale``
receives ``dL/dscale``, so DDP's averaging over ranks yields exactly the
single-process full-batch gradient. (This assumes, as ``loss.backward()`` on
every rank does, that every rank backpropagates the same upstream gradient.)
Here each rank backpropagates its own rows' share of L, with gradient
``W * g``: the ring's (or the all-gather's) backward collects the shares of
every rank; the scale's gradient is summed over ranks, divided by W.

Every rank must call the loss, and its backward, the same number of times
with the same settings: both are collective. Inputs are checked on every
rank and their shapes, dtypes and settings exchanged (one small all_gather)
before any features move, so that a bad input or a mismatch between ranks
raises the same error everywhere instead of hanging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from mmkernels import _checks, backends
from mmkernels.distributed._autograd import (AllGather, LossOverRanks, SharedScalar,
                                             SumOverRanks, gather_rows)
from mmkernels.distributed._kernels import ring_kernels
from mmkernels.distributed._ring import RankFacts, Ring, Slots
from mmkernels.ops import _common
from mmkernels.ops import logsumexp as _lse
from mmkernels.ops.contrastive import contrastive_loss as _single_process_loss
from mmkernels.ops.contrastive import info_nce as _info_nce
from mmkernels.ops.contrastive import pair_losses

STRATEGIES = ("ring", "gather")


# --- checks, done on every rank and agreed on before any features move -------

# Per-rank facts exchanged before the loss runs; a rank whose own inputs are
# invalid sends ok = 0 and raises its own error, the others raise one naming it.
_FIELDS = ("ok", "rows", "D", "dtype", "normalize", "label_smoothing", "strategy",
           "needs_grad", "scale_needs_grad", "text_needs_grad", "logit_scale")


def _agree(group, image_features, text_features, logit_scale, *, strategy, normalize,
           label_smoothing, backend, claimed=None):
    """Check the inputs on this rank, exchange what the ranks must agree on, and raise
    the same error on every rank when something is wrong.

    ``claimed``: (rank, world_size) as a caller was configured (ClipLoss), checked
    against the group. Returns ``(ring, scale, backend_name, text_trains)``, the last
    True when some rank's text features require grad (else no rank's backward
    needs the products for the text side: a frozen text tower).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("mmkernels.distributed: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (or use "
                           "mmkernels.contrastive_loss on one process)")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    error, scale, name = None, None, None
    try:
        if claimed is not None and tuple(claimed) != (rank, size):
            raise ValueError(f"ClipLoss: rank={claimed[0]}, world_size={claimed[1]}, but the "
                             f"process group has this process as rank {rank} of {size}")
        _checks.check_pair("image_features", image_features, "text_features", text_features,
                           same_rows=True)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        _checks.check_label_smoothing(label_smoothing)
        name = backends.select_backend(backend, image_features.device)
        if strategy == "ring" and name == "naive":
            raise ValueError("strategy='ring' needs a tiled backend's kernels, and the 'naive' "
                             "backend materializes S instead: use strategy='gather' with it")
        scale = _checks.as_scalar_tensor("logit_scale", logit_scale, image_features)
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc

    like = next((x for x in (image_features, text_features) if isinstance(x, Tensor)), None)
    device = like.device if like is not None else torch.device("cpu")
    facts = None
    if error is None:
        grad_on = torch.is_grad_enabled()
        facts = [1.0, image_features.shape[0], image_features.shape[1],
                 _checks.FLOAT_DTYPES.index(image_features.dtype), float(normalize),
                 float(label_smoothing), STRATEGIES.index(strategy),
                 float(grad_on and (image_features.requires_grad or text_features.requires_grad
                                    or scale.requires_grad)),
                 float(grad_on and scale.requires_grad),
                 float(grad_on and text_features.requires_grad)]
    shared = RankFacts.share(facts, scale, _FIELDS, device, group, error)
    _check_agreement(shared)
    table = shared.table
    sizes = tuple(int(row["rows"]) for row in table)
    text_trains = any(row["text_needs_grad"] for row in table)
    return Ring(group, rank, size, sizes), scale, name, text_trains


def _check_agreement(facts: RankFacts) -> None:
    """Raise (identically on every rank) when the ranks' facts are inconsistent."""
    per_rank, differs = facts.per_rank, facts.differs

    if differs("D"):
        raise ValueError("image_features/text_features: the feature dimension D differs across "
                         f"ranks ({per_rank('D', int)}); every rank must pass (local_N, D) features "
                         "with the same D")
    if differs("dtype"):
        raise _checks.DTypeError(
            "image_features/text_features: the dtype differs across ranks "
            f"({per_rank('dtype', lambda v: _checks.FLOAT_DTYPES[int(v)])}); every rank must "
            "pass features of the same dtype")
    for field, what in (("strategy", "strategy"), ("normalize", "normalize"),
                        ("label_smoothing", "label_smoothing"), ("logit_scale", "logit_scale")):
        if differs(field):
            show = (lambda v: STRATEGIES[int(v)]) if field == "strategy" else (lambda v: v)
            raise ValueError(f"{what}: differs across ranks ({per_rank(field, show)}); every "
                             "rank must compute the same loss")
    if differs("needs_grad") or differs("scale_needs_grad"):
        raise ValueError("mmkernels.distributed: some ranks need gradients and others do not "
                         f"(features or logit_scale requiring grad: {per_rank('needs_grad', bool)}; "
                         f"logit_scale: {per_rank('scale_needs_grad', bool)}); the backward is "
                         "collective, so every rank must take part in it")


# --- ring strategy -------------------------------------------------------------

def _ring_forward(a: Tensor, b: Tensor, scale: Tensor, normalize: bool, ring: Ring, fwd):
    """(row_lse, col_lse) of this rank's rows against the global batch, by the ring."""
    d = a.shape[1]
    block = b.contiguous()  # the visiting text block (this rank's own at step 0); sent as is
    blocks = Slots(2, max(ring.sizes) * d, b)
    row_lse = col_done = None
    for step in range(ring.size):
        v = ring.visiting(step)
        sends, receives, incoming, col_in = [], [], None, None
        if step < ring.size - 1:  # send this block on, receive the next
            incoming = blocks.take(step, ring.sizes[ring.visiting(step + 1)], d)
            sends.append((block, 1))
            receives.append((incoming, -1))
        if step > 0:  # the previous block's column statistics follow it, one step behind
            col_in = a.new_empty(ring.sizes[v], dtype=_checks.compute_dtype(a.dtype))
            sends.append((col_done, 1))
            receives.append((col_in, -1))
        pending = ring.start(sends, receives)
        row_k, col_k = fwd(a, block, scale, normalize)
        pending.wait()
        row_lse = row_k if row_lse is None else torch.logaddexp(row_lse, row_k)
        col_done = col_k if col_in is None else torch.logaddexp(col_k, col_in)
        block = incoming
    if ring.size == 1:
        return row_lse, col_done
    # col_done is complete for the block of rank + 1: one more hop takes it home.
    (col_lse,) = ring.start([(col_done, 1)], [(torch.empty_like(row_lse), -1)]).wait()
    return row_lse, col_lse


def _ring_backward(a, b, scale, normalize, row_lse, col_lse, g_row, g_col, ring: Ring, bwd,
                   needs_input_grad, text_trains: bool):
    """Gradients of (a, b, scale's share) by the ring: pb stays home, pa travels.

    A frozen side costs no product: pa (and its travelling accumulator) only when
    some rank's text features train (``text_trains``), pb only when this rank's
    images train or its scale share is taken from pb (when no pa is computed)."""
    needs_a, _, needs_scale = needs_input_grad
    compute_pa = text_trains
    compute_pb = needs_a or (needs_scale and not compute_pa)
    d, largest = a.shape[1], max(ring.sizes)
    # What travels: the block, its col_lse and g_col, and (one step behind) its pa accumulator.
    block, stats = b.contiguous(), torch.stack([col_lse, g_col])
    blocks, block_stats = Slots(2, largest * d, b), Slots(2, 2 * largest, stats)
    accumulators = Slots(1, largest * d, row_lse)  # emptied (added to pa_k) within its step
    pb = acc = None
    for step in range(ring.size):
        v = ring.visiting(step)
        sends, receives, incoming, incoming_stats, acc_in = [], [], None, None, None
        if step < ring.size - 1:
            rows = ring.sizes[ring.visiting(step + 1)]
            incoming, incoming_stats = blocks.take(step, rows, d), block_stats.take(step, 2, rows)
            sends += [(block, 1), (stats, 1)]
            receives += [(incoming, -1), (incoming_stats, -1)]
        if step > 0 and compute_pa:  # the previous block's accumulator follows it, one step behind
            acc_in = accumulators.take(step, ring.sizes[v], d)
            sends.append((acc, 1))
            receives.append((acc_in, -1))
        pending = ring.start(sends, receives)
        pb_k, pa_k = bwd(a, block, scale, normalize, row_lse, stats[0], g_row, stats[1],
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
    it is sent home while the home rows' gradients are formed, and ours received."""
    needs_a, needs_b, needs_scale = needs_input_grad
    d = a.shape[1]
    # acc is complete for the block of rank + 1: send it home, and receive ours while
    # the home rows' gradients are formed.
    pending = ring.start([(acc, 1)], [(acc.new_empty(b.shape[0], d), -1)]) if compute_pa else None
    grad_a, _, grad_scale = _common.grads_from_products(
        a, b, scale, normalize, pb, None, (needs_a, False, needs_scale and compute_pb))
    pa = pending.wait()[0] if compute_pa else None
    _, grad_b, scale_from_pa = _common.grads_from_products(
        a, b, scale, normalize, None, pa, (False, needs_b, needs_scale and not compute_pb))
    return grad_a, grad_b, grad_scale if compute_pb else scale_from_pa


class _RingLogSumExp(torch.autograd.Function):
    """(row_lse, col_lse) of the local rows against the global batch, by the ring.

    Backward: given this rank's upstream gradients of its rows' statistics, the
    gradients of its features collect the contributions of every rank's rows
    (the ring), and the scale's gradient is this rank's share (its rows' <Ah, pb>).
    """

    @staticmethod
    def forward(ctx, a, b, scale, normalize, ring, kernels, text_trains):
        fwd, bwd = kernels
        row_lse, col_lse = _ring_forward(a, b, scale, normalize, ring, fwd)
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.normalize, ctx.ring, ctx.bwd, ctx.text_trains = normalize, ring, bwd, text_trains
        return row_lse, col_lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g_row, g_col):
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        g_row = torch.zeros_like(row_lse) if g_row is None else g_row.contiguous()
        g_col = torch.zeros_like(col_lse) if g_col is None else g_col.contiguous()
        grads = _ring_backward(a, b, scale, ctx.normalize, row_lse, col_lse, g_row, g_col,
                               ctx.ring, ctx.bwd, ctx.needs_input_grad[:3], ctx.text_trains)
        return (*grads, None, None, None, None)


# --- gather strategy -----------------------------------------------------------

def _gather_lse(a: Tensor, b: Tensor, scale: Tensor, normalize: bool, ring: Ring, name: str):
    """(row_lse, col_lse) of the local rows from all-gathered features, by the
    single-process primitive: a_r against all texts, b_r against all images."""
    all_a, all_b = AllGather.apply(a, ring), AllGather.apply(b, ring)
    row_lse, _ = _lse.lse(a, all_b, scale, normalize, name)
    col_lse, _ = _lse.lse(b, all_a, scale, normalize, name)
    return row_lse, col_lse


# --- the loss ------------------------------------------------------------------

def _global_loss(image_features, text_features, logit_scale, *, group, strategy, normalize,
                 label_smoothing, backend, gather_with_grad: bool, claimed=None) -> Tensor:
    """The global-batch loss on every rank. Feature gradients: W * dL/dx with
    ``gather_with_grad`` (open_clip's gather_with_grad=True), dL/dx without."""
    ring, scale, name, text_trains = _agree(group, image_features, text_features, logit_scale,
                                            strategy=strategy, normalize=normalize,
                                            label_smoothing=label_smoothing, backend=backend,
                                            claimed=claimed)
    if ring.size == 1:
        return _single_process_loss(image_features, text_features, scale, normalize=normalize,
                                    label_smoothing=label_smoothing, backend=name)
    multiplier = float(ring.size) if gather_with_grad else 1.0
    if scale.requires_grad:
        scale = SharedScalar.apply(scale, ring, multiplier)
    if strategy == "ring":
        kernels = ring_kernels("logsumexp", name, image_features.device)
        row_lse, col_lse = _RingLogSumExp.apply(image_features, text_features, scale, normalize,
                                                ring, kernels, text_trains)
    else:
        row_lse, col_lse = _gather_lse(image_features, text_features, scale, normalize, ring,
                                       name)
    # The O(n * D) terms of the local pairs, as on one process; label smoothing's
    # row means need the global sums of the features.
    per_pair = pair_losses(image_features, text_features, row_lse, col_lse, scale, normalize,
                           label_smoothing, n=ring.total,
                           batch_sum=lambda v: SumOverRanks.apply(v, ring))
    return LossOverRanks.apply(per_pair.sum() / ring.total, ring, multiplier)


@_checks.outside_autocast
def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale=1.0, *,
                     group=None, strategy: str = "ring", normalize: bool = False,
                     label_smoothing: float = 0.0, backend: str = "auto") -> Tensor:
    """Symmetric CLIP loss of the global batch spread over a process group.

    Each rank passes its own shard (shards may differ in size); every rank
    returns the loss of the whole global batch (the shards concatenated in
    rank order), equal to :func:`mmkernels.contrastive_loss` on it. Gradients
    are those of open_clip's ``ClipLoss(gather_with_grad=True)``: each rank's
    feature gradient is ``world_size * dL/d(local features)`` and logit_scale
    gets ``dL/dscale``, so DDP's averaging yields exactly the single-process
    full-batch gradient. Collective: every rank must call it, and backpropagate
    through it, with the same settings.

    Args:
        image_features, text_features: this rank's (local_N, D) shard; same
            dtype (fp16, bf16, fp32, fp64) and device; the same D and dtype on
            every rank.
        logit_scale: the multiplier (already exponentiated), a number or a
            0-dim tensor that receives its gradient; the same on every rank.
        group: the process group (default: the default group).
        strategy: "ring" (point-to-point ring, memory O(local_N * D) per rank)
            or "gather" (all-gather of the features, O(global_N * D)).
        normalize, label_smoothing: as in :func:`mmkernels.contrastive_loss`.
        backend: the kernels for the tiles, "auto" (the best for the tensors'
            device) or a backend name; "naive" only with strategy="gather".

    Returns:
        The global-batch mean loss, fp32 (fp64 for fp64 inputs), on every rank.

    Raises:
        ValueError/TypeError on every rank when any rank's inputs are invalid,
        or when D, dtype, logit_scale or the settings differ across ranks.
    """
    return _global_loss(image_features, text_features, logit_scale, group=group,
                        strategy=strategy, normalize=normalize, label_smoothing=label_smoothing,
                        backend=backend, gather_with_grad=True)


@_checks.outside_autocast
def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *, local_loss: bool,
              gather_with_grad: bool, group=None, strategy: str = "ring",
              backend: str = "auto", claimed=None) -> Tensor:
    """open_clip's distributed ``ClipLoss`` (world_size > 1), tiled; what
    :class:`mmkernels.ClipLoss` runs for world_size > 1.

    - ``local_loss=False``: the global-batch loss on every rank (by ``strategy``);
      feature gradients ``W * dL/dx`` with ``gather_with_grad``, ``dL/dx`` without
      (open_clip then gives a rank only its own slot's gradient).
    - ``local_loss=True``: this rank's rows against the gathered batch, both
      ways, averaged over its rows (open_clip's local loss; the labels of the
      local rows are their global indices). Features are gathered with gradient
      (the gather's backward sums over ranks) when ``gather_with_grad``, else
      without (only the local rows' own logits carry gradient). logit_scale
      gets this rank's local gradient. Memory O(global_N * D), as open_clip.

    ``claimed``: the (rank, world_size) the caller was configured with, checked
    against the group on every rank.
    """
    if not local_loss:
        return _global_loss(image_features, text_features, logit_scale, group=group,
                            strategy=strategy, normalize=False, label_smoothing=0.0,
                            backend=backend, gather_with_grad=gather_with_grad, claimed=claimed)
    # No ring here: each rank's rows meet the gathered batch in the single-process ops.
    ring, scale, name, _ = _agree(group, image_features, text_features, logit_scale,
                                  strategy="gather", normalize=False, label_smoothing=0.0,
                                  backend=backend, claimed=claimed)
    if gather_with_grad:
        all_image, all_text = (AllGather.apply(x, ring) for x in (image_features, text_features))
    else:
        with torch.no_grad():
            all_image, all_text = (gather_rows(x, ring) for x in (image_features, text_features))
    labels = ring.offset + torch.arange(ring.sizes[ring.rank], device=image_features.device)
    image_to_text = _info_nce(image_features, all_text, labels, scale, backend=name)
    text_to_image = _info_nce(text_features, all_image, labels, scale, backend=name)
    return (image_to_text + text_to_image) / 2
