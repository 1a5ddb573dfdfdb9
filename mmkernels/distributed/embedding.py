r"""sentence-transformers' MultipleNegativesRankingLoss of a global batch spread over
torch.distributed ranks, by a point-to-point ring: O(local_N * (1+k) * D) per rank.

Maths
-----
Each of the W ranks holds queries ``q_r`` (n_r, D) and documents ``docs_r``
(n_r * (1+k), D) in the single-process layout (ops/embedding.py): the positives
``d^0_r`` first, then k blocks of hard negatives ``d^b_r``, row i of each block
belonging to query i. The global batch is what sentence-transformers builds with
``gather_across_devices=True`` (its all-gather of each column): the queries
concatenated in rank order, and each document block concatenated in rank order::

    Q = [q_0; ...; q_{W-1}]          D^b = [d^b_0; ...; d^b_{W-1}]  (b = 0..k)
    docs = [D^0; D^1; ...; D^k]                                      (N*(1+k), D)

and the loss is :func:`mmkernels.multiple_negatives_loss` of ``(Q, docs)``: the
sum (or mean) over the N = sum_r n_r queries of ``log Z_i - p_i``. Query i of
rank r has the global id ``g = offset_r + i``; so does every document of its row
in each block (the documents "of query g"). A logsumexp does not depend on the
order of its candidates, so each rank may visit the other ranks' blocks in any
order: only these ids matter.

Ring
----
Rank r's rows need three matrices against the whole batch, each computed one
visiting block ``v`` at a time by the masked primitive (ops/masked_logsumexp.py),
whose rules then speak in global ids:

- ``q_r x docs_v`` (always): row statistics = query_to_doc; column statistics
  of its first n_v columns = doc_to_query of rank v's positives (they travel
  with the block, as the column statistics of the CLIP ring do: clip.py).
  The positive of row i is column i when v = r, else none (-1). Margin: row
  threshold ``p + m`` of the home queries, column threshold ``p + m`` of the
  visiting positives (+inf on the hard negatives, whose column statistics go
  unused).
- ``q_r x q_v`` (query_to_query): groups = the global query ids of rows and
  columns (this excludes exactly the pair of a query with itself), no positive.
- ``d^0_r x docs_v`` (doc_to_doc): row groups = the home queries' ids, column
  groups = the id of each visiting document's query (``offset_v + j mod n_v``),
  which excludes every document of the row's own query; no positive.

The thresholds of the visiting blocks come from one all-gather of the N
positive logits (O(N) numbers; no features). Each matrix is one autograd node,
the ring of the primitive (:class:`~mmkernels.distributed._lse_ring.RingLogSumExp`,
the CLIP loss's too) with the masked kernels: the next block is sent while the current one is computed on; in the backward the block
travels again with its column statistics and upstream column gradients, the
products for the home rows (pb) stay home and those for the visiting rows (pa)
travel in an accumulator that comes home after one lap. Autograd sums the
gradients of a tensor used by several nodes (q_r in all three). Per rank, at
any time: the local inputs, two visiting blocks, one accumulator and a tile:
O(n_r * (1+k) * D), whatever W; plus O(N) scalars (the gathered thresholds).

Gradients
---------
As :func:`mmkernels.distributed.contrastive_loss` (clip.py): every rank
returns the global loss L; each rank's feature gradients are ``W * dL/dx`` of
its own rows and ``logit_scale`` receives ``dL/dscale``, so DDP's averaging
yields the single-process gradient of the global batch. sentence-transformers'
``gather_across_devices=True`` gives the same feature gradients (its
all-gather's backward sums every rank's loss, each the mean over its own rows;
with equal shards the sum is W times the global mean), while its value on each
rank is its own rows' mean: the mean of those over ranks is L.

Every rank must call the loss, and its backward, with the same settings; the
inputs are checked on every rank and the ranks' shapes and settings exchanged
before any features move, so that an error is raised on every rank instead of
a hang.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmkernels import _checks
from mmkernels.distributed._autograd import LossOverRanks, SharedScalar, gather_rows
from mmkernels.distributed._ring import RankFacts, Ring
from mmkernels.distributed._lse_ring import RingLogSumExp
from mmkernels.ops import masked_logsumexp as _masked
from mmkernels.ops.contrastive import Side, check_margin
from mmkernels.ops.embedding import DIRECTIONS, _check_directions, _docs_matrix, log_partition
from mmkernels.ops.embedding import multiple_negatives_loss as _single_process_loss

PARTITION_MODES = ("joint", "per_direction")
REDUCTIONS = ("mean", "sum")  # every rank returns the global loss: no per-row "none"


# --- checks, done on every rank and agreed on before any features move -------

_FIELDS = ("ok", "rows", "blocks", "D", "dtype", "directions", "partition_mode", "has_margin",
           "margin", "normalize", "reduction", "query_needs_grad", "docs_needs_grad",
           "scale_needs_grad", "logit_scale")


def _check_locally(query, docs, logit_scale, directions, partition_mode, margin, normalize,
                   reduction, backend):
    """This rank's inputs checked; returns (docs matrix, directions, margin, scale, backend)."""
    docs = _docs_matrix(query, docs)
    directions = _check_directions(directions, partition_mode)
    margin = check_margin(margin)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS} (every rank returns the "
                         f"global loss), got {reduction!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    # The ring expresses every block's rules through the masked primitive.
    name = _masked.masked_backend(backend, query.device)
    scale = _checks.as_scalar_tensor("logit_scale", logit_scale, query)
    return docs, directions, margin, scale, name


def _agree(group, query, docs, logit_scale, *, directions, partition_mode, margin, normalize,
           reduction, backend):
    """Check the inputs on this rank, exchange what the ranks must agree on (one small
    all_gather), and raise the same error on every rank when something is wrong.

    Returns ``(ring, docs, directions, margin, scale, backend_name, trains)``:
    ``trains`` says which sides train on some rank ("query", "docs"), which tells
    the ring's backward whether to compute (and send round) the visiting side's
    products."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("mmkernels.distributed: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (or use "
                           "mmkernels.multiple_negatives_loss on one process)")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    error, scale = None, None
    try:
        docs, directions, margin, scale, name = _check_locally(
            query, docs, logit_scale, directions, partition_mode, margin, normalize,
            reduction, backend)
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    device = query.device if isinstance(query, Tensor) else torch.device("cpu")
    facts = None
    if error is None:
        grad_on = torch.is_grad_enabled()
        facts = [1.0, query.shape[0], docs.shape[0] // query.shape[0], query.shape[1],
                 _checks.FLOAT_DTYPES.index(query.dtype),
                 float(sum(2 ** DIRECTIONS.index(d) for d in directions)),
                 PARTITION_MODES.index(partition_mode), float(margin is not None),
                 0.0 if margin is None else margin, float(normalize),
                 REDUCTIONS.index(reduction), float(grad_on and query.requires_grad),
                 float(grad_on and docs.requires_grad), float(grad_on and scale.requires_grad)]
    shared = RankFacts.share(facts, scale, _FIELDS, device, group, error)
    _check_agreement(shared)
    table = shared.table
    ring = Ring(group, rank, size, tuple(int(row["rows"]) for row in table))
    trains = {"query": bool(table[0]["query_needs_grad"]),
              "docs": bool(table[0]["docs_needs_grad"])}
    return ring, docs, directions, margin, scale, name, trains


def _check_agreement(facts: RankFacts) -> None:
    """Raise (identically on every rank) when the ranks' facts are inconsistent."""
    per_rank, differs = facts.per_rank, facts.differs

    if differs("D"):
        raise ValueError("query/docs: the feature dimension D differs across ranks "
                         f"({per_rank('D', int)}); every rank must pass features with the same D")
    if differs("dtype"):
        raise _checks.DTypeError(
            "query/docs: the dtype differs across ranks "
            f"({per_rank('dtype', lambda v: _checks.FLOAT_DTYPES[int(v)])}); every rank must "
            "pass features of the same dtype")
    if differs("blocks"):
        raise ValueError("docs: the number of hard-negative blocks k differs across ranks "
                         f"({per_rank('blocks', lambda v: int(v) - 1)}); every rank must pass "
                         "local_N * (1+k) documents with the same k")
    for field in ("directions", "partition_mode", "has_margin", "margin", "normalize",
                  "reduction", "logit_scale"):
        if differs(field):
            what = "false_negative_margin" if field in ("has_margin", "margin") else field
            raise ValueError(f"{what}: differs across ranks ({per_rank(field)}); every rank "
                             "must compute the same loss")
    for field, what in (("query_needs_grad", "query"), ("docs_needs_grad", "docs"),
                        ("scale_needs_grad", "logit_scale")):
        if differs(field):
            raise ValueError(f"{what}: requires grad on some ranks and not on others "
                             f"({per_rank(field, bool)}); the backward is collective, so "
                             "every rank must take part in it")


# --- the rules of each matrix, in global ids --------------------------------------

class _GlobalBatch:
    """Where each rank's rows sit in the global batch, and the rules of the three
    matrices for the block of a visiting rank ``v`` (the masked primitive's
    argument tuple: exclude_diagonal, positives, row_groups, col_groups,
    row_threshold, col_threshold)."""

    def __init__(self, ring: Ring, blocks: int, thresholds, device):
        self.ring, self.blocks, self.device = ring, blocks, device
        self.thresholds = thresholds  # (N,) p + m of every query, or None without a margin
        self.home = self._ids(ring.rank)

    def _ids(self, v: int) -> Tensor:
        """Global ids of rank v's queries."""
        start = sum(self.ring.sizes[:v])
        return torch.arange(start, start + self.ring.sizes[v], device=self.device)

    def _threshold(self, v: int):
        if self.thresholds is None:
            return None
        start = sum(self.ring.sizes[:v])
        return self.thresholds[start:start + self.ring.sizes[v]]

    def _no_positive(self) -> Tensor:
        return torch.full_like(self.home, -1)

    def query_docs(self, with_columns: bool):
        def rules(v):
            n_v = self.ring.sizes[v]
            positives = (torch.arange(len(self.home), device=self.device) if v == self.ring.rank
                         else self._no_positive())
            col_threshold = None
            if with_columns and self.thresholds is not None:
                visiting = self._threshold(v)
                col_threshold = torch.cat([visiting,
                                           visiting.new_full((n_v * (self.blocks - 1),),
                                                             float("inf"))])
            return (False, positives, None, None, self._threshold(self.ring.rank), col_threshold)
        return rules

    def query_query(self):
        def rules(v):
            return (False, self._no_positive(), self.home, self._ids(v),
                    self._threshold(self.ring.rank), None)
        return rules

    def doc_doc(self):
        def rules(v):
            owners = self._ids(v).repeat(self.blocks)  # the query of each visiting document
            return (False, self._no_positive(), self.home, owners, self._threshold(self.ring.rank),
                    None)
        return rules


# --- the loss ----------------------------------------------------------------------

def _global_per_row(query, docs, scale, ring: Ring, directions, partition_mode, margin,
                    normalize, name, trains):
    """The per-row losses ``log Z_i - p_i`` of this rank's queries against the global batch."""
    n = query.shape[0]
    blocks = docs.shape[0] // n
    d_pos = docs[:n]
    positive = scale * Side(query, normalize).dot(Side(d_pos, normalize))  # p_i
    thresholds = None
    if margin is not None:  # every rank's p + m: the visiting blocks' thresholds (O(N))
        own = (positive.detach() + margin).to(_checks.compute_dtype(query.dtype))
        thresholds = gather_rows(own.unsqueeze(1), ring).squeeze(1).contiguous()
    batch = _GlobalBatch(ring, blocks, thresholds, query.device)
    kernels = _masked.KERNELS.kernels(name, query.device)
    query_rows = ring.sizes
    doc_rows = tuple(rows * blocks for rows in ring.sizes)

    with_columns = "doc_to_query" in directions
    row_lse, col_lse = RingLogSumExp.apply(
        query, docs, scale, normalize, ring, doc_rows, batch.query_docs(with_columns), kernels,
        with_columns, trains["docs"])
    stats = {"query_to_doc": row_lse}
    if with_columns:
        stats["doc_to_query"] = col_lse[:n]
    if "query_to_query" in directions:
        stats["query_to_query"], _ = RingLogSumExp.apply(
            query, query, scale, normalize, ring, query_rows, batch.query_query(), kernels,
            False, trains["query"])
    if "doc_to_doc" in directions:
        stats["doc_to_doc"], _ = RingLogSumExp.apply(
            d_pos, docs, scale, normalize, ring, doc_rows, batch.doc_doc(), kernels, False,
            trains["docs"])
    return log_partition(stats, directions, partition_mode) - positive


@_checks.outside_autocast
def multiple_negatives_loss(query: Tensor, docs, *, logit_scale=20.0,
                            directions=("query_to_doc",), partition_mode: str = "joint",
                            false_negative_margin=None, normalize: bool = True,
                            reduction: str = "mean", backend: str = "auto",
                            group=None) -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss of the global batch spread over a
    process group, by a ring: memory O(local_N * (1+k) * D) per rank.

    Each rank passes its own queries and documents (local batches may differ in
    size; k must not); every rank returns the loss of the global batch, equal to
    :func:`mmkernels.multiple_negatives_loss` on the queries concatenated in rank
    order and each document block concatenated in rank order (the batch that
    sentence-transformers' ``gather_across_devices=True`` builds). Gradients are
    those of :func:`mmkernels.distributed.contrastive_loss`: each rank's feature
    gradients are ``world_size * dL/d(local features)`` and logit_scale gets
    ``dL/dscale``, so DDP's averaging yields the single-process gradient.
    Collective: every rank must call it, and backpropagate through it, with the
    same settings.

    Args:
        query: this rank's (local_N, D) queries.
        docs: this rank's (local_N * (1+k), D) documents, the local_N positives
            first, then k blocks of local_N hard negatives; or a list of k+1
            (local_N, D) tensors. Same dtype and device as ``query``.
        logit_scale, directions, partition_mode, false_negative_margin, normalize:
            as in :func:`mmkernels.multiple_negatives_loss`; the same on every rank.
        reduction: "mean" or "sum" over the global batch ("none" is refused:
            every rank returns the global loss).
        backend: "auto" or a backend with the masked primitive (naive, torch, cpu,
            cuda, triton); the ring runs it on each (local x visiting) block.
        group: the process group (default: the default group).

    Returns:
        The global loss, fp32 (fp64 for fp64 inputs), on every rank.

    Raises:
        ValueError/TypeError on every rank when any rank's inputs are invalid, or
        when D, dtype, k, logit_scale, a setting or "requires grad" differs
        across ranks; RuntimeError when torch.distributed is not initialized.
    """
    ring, docs, directions, margin, scale, name, trains = _agree(
        group, query, docs, logit_scale, directions=directions, partition_mode=partition_mode,
        margin=false_negative_margin, normalize=normalize, reduction=reduction, backend=backend)
    if ring.size == 1:
        return _single_process_loss(query, docs, logit_scale=scale, directions=directions,
                                    partition_mode=partition_mode, false_negative_margin=margin,
                                    normalize=normalize, reduction=reduction, backend=name)
    multiplier = float(ring.size)
    if scale.requires_grad:
        scale = SharedScalar.apply(scale, ring, multiplier)
    per_row = _global_per_row(query, docs, scale, ring, directions, partition_mode, margin,
                              normalize, name, trains)
    share = per_row.sum() / (ring.total if reduction == "mean" else 1)
    return LossOverRanks.apply(share, ring, multiplier)
