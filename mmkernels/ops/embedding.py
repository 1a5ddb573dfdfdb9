r"""Embedding-training losses (sentence-transformers' MultipleNegativesRankingLoss) as
compositions of the masked logsumexp primitive.

Maths
-----
Queries ``q`` (N, D); documents ``d = [d^0; d^1; ...; d^k]`` (N*(1+k), D): ``d^0``
holds the positives (``d^0_i`` pairs with ``q_i``), each ``d^b`` (b >= 1) a block of
hard negatives, row i belonging to query i. With ``sim`` the cosine similarity
(``normalize=True``) or the dot product and ``s`` the logit scale, query i's
positive logit is ``p_i = s * sim(q_i, d^0_i)`` and each direction contributes a
set of candidate logits to row i's denominator:

- ``query_to_doc``:   ``s * sim(q_i, d_j)`` for every document j (the positive among them);
- ``query_to_query``: ``s * sim(q_i, q_j)`` for j != i;
- ``doc_to_query``:   ``s * sim(q_j, d^0_i)`` for every query j (column i of q x d^0);
- ``doc_to_doc``:     ``s * sim(d^0_i, d_j)`` for every document j not of query i
  (``j mod N != i``).

Row i's loss is ``log Z_i - p_i``. "joint": ``log Z_i`` is the logsumexp over the
union of the chosen directions' candidates; the sets are disjoint, so it is the
logaddexp of the per-direction logsumexps. "per_direction": the mean of the
per-direction logsumexps (only query_to_doc and doc_to_query, the directions
whose candidates include the positive). This is exactly
``MultipleNegativesRankingLoss.compute_loss_from_embeddings`` of
sentence-transformers 6.x (its ``scale`` is ``s``; cos_sim or dot_score).

``false_negative_margin = m`` (GTE, Qwen3-Embedding): a candidate whose logit
exceeds ``p_i + m`` (strictly; logit units, after the scale: a margin c on the
similarity is ``m = s * c``) leaves row i's denominator in every direction; the
positive never does. The threshold carries no gradient.

Composition
-----------
One primitive call per matrix, each giving the statistics of the directions it
holds, plus O(N*D) terms (the positive logits):

- ``q x d``: row lse = query_to_doc; column lse of the first N columns =
  doc_to_query (column i of ``q x d^0`` is column i of ``q x d``), so doc_to_query
  costs no extra call. Margin: row threshold ``p + m``, column threshold ``p + m``
  on the first N columns (+inf on the hard negatives', whose column statistics go
  unused); the pair (i, i) is the positive of row i and of column i.
- ``q x q`` (query_to_query): the diagonal excluded, no positive.
- ``d^0 x d`` (doc_to_doc): groups ``i`` for row i and ``j mod N`` for column j
  exclude each query's own documents, no positive.

Nothing of size N x N or N x N*k exists on the tiled backends; the naive
backend runs the reference below (sentence-transformers' own algorithm on the
materialized matrices).

Numerics
--------
As in ops/contrastive.py: the loss is fp32 (fp64 for fp64 inputs) whatever the
input dtype; gradients come back in the input dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mmkernels import _checks, backends
from mmkernels.ops import masked_logsumexp
from mmkernels.ops.contrastive import Side, check_margin, reduce_losses
from mmkernels.ops.logsumexp import similarity_logsumexp, similarity_matrix

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
_SELF_DIRECTIONS = ("query_to_query", "doc_to_doc")


# --- the arguments, checked once ---------------------------------------------------

def _docs_matrix(query: Tensor, docs) -> Tensor:
    """The (N*(1+k), D) documents from either layout; raises naming ``docs``."""
    _checks.check_features("query", query)
    if isinstance(docs, (list, tuple)):
        if not docs:
            raise ValueError("docs: expected at least one (N, D) tensor (the positives), got an "
                             "empty sequence")
        for b, block in enumerate(docs):
            _checks.check_pair("query", query, f"docs[{b}]", block, same_rows=True)
        return docs[0] if len(docs) == 1 else torch.cat(list(docs), 0)
    _checks.check_pair("query", query, "docs", docs, same_rows=False)
    n, m = query.shape[0], docs.shape[0]
    if m % n:
        raise ValueError(f"docs: expected N*(1+k) rows (the N positives, then k blocks of N hard "
                         f"negatives) for N = {n} queries, got {m} rows")
    return docs


def _check_directions(directions, partition_mode) -> tuple[str, ...]:
    if isinstance(directions, str) or not isinstance(directions, Sequence):
        raise TypeError(f"directions: expected a tuple of direction names, got "
                        f"{type(directions).__name__} {directions!r}")
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise ValueError(f"directions: unknown {unknown}; expected a subset of {DIRECTIONS}")
    if "query_to_doc" not in directions:
        raise ValueError(f"directions: 'query_to_doc' is required (it holds the positive pair), "
                         f"got {tuple(directions)}")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode: expected 'joint' or 'per_direction', got "
                         f"{partition_mode!r}")
    if partition_mode == "per_direction" and set(directions) & set(_SELF_DIRECTIONS):
        # sentence-transformers refuses it too: these candidate sets never hold the positive
        raise ValueError(f"partition_mode: 'per_direction' needs every direction's candidates to "
                         f"include the positive; {sorted(set(directions) & set(_SELF_DIRECTIONS))} "
                         f"do not (use partition_mode='joint')")
    return tuple(dict.fromkeys(directions))  # a repeated direction counts once, as in theirs


# --- reference (the naive backend): sentence-transformers' algorithm ------------------

def _reference_per_row(query, docs, scale, directions, partition_mode, margin, normalize):
    n = query.shape[0]
    d_pos = docs[:n]
    q_to_d = similarity_matrix(query, docs, scale, normalize)
    positive = q_to_d.diagonal()
    blocks = {"query_to_doc": q_to_d}
    if "query_to_query" in directions:
        blocks["query_to_query"] = similarity_matrix(query, query, scale, normalize).masked_fill(
            torch.eye(n, dtype=torch.bool, device=query.device), float("-inf"))
    if "doc_to_query" in directions:
        blocks["doc_to_query"] = q_to_d[:, :n].T
    if "doc_to_doc" in directions:
        own = torch.eye(n, dtype=torch.bool, device=query.device).repeat(1, docs.shape[0] // n)
        blocks["doc_to_doc"] = similarity_matrix(d_pos, docs, scale, normalize).masked_fill(
            own, float("-inf"))
    if margin is not None:
        threshold = (positive + margin).detach().unsqueeze(1)
        for name, s in blocks.items():
            out = s.detach() > threshold
            if name in ("query_to_doc", "doc_to_query"):
                out[:, :n].fill_diagonal_(False)  # the positive stays
            blocks[name] = s.masked_fill(out, float("-inf"))
    blocks = [blocks[d] for d in DIRECTIONS if d in blocks]
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(blocks, 1), 1)
    else:
        log_z = sum(torch.logsumexp(s, 1) for s in blocks) / len(blocks)
    return log_z - positive


# --- the composition ---------------------------------------------------------------

def _per_row(query, docs, scale, directions, partition_mode, margin, normalize, backend):
    n, m = query.shape[0], docs.shape[0]
    d_pos = docs[:n]
    positive = scale * Side(query, normalize).dot(Side(d_pos, normalize))  # p_i
    threshold = None if margin is None else positive.detach() + margin
    no_positive = torch.full((n,), -1, dtype=torch.int64, device=query.device)

    col_threshold = None
    if threshold is not None and "doc_to_query" in directions:
        col_threshold = torch.cat([threshold, threshold.new_full((m - n,), float("inf"))])
    row_lse, col_lse = similarity_logsumexp(query, docs, scale, normalize=normalize,
                                            row_threshold=threshold, col_threshold=col_threshold,
                                            backend=backend)
    stats = {"query_to_doc": row_lse, "doc_to_query": col_lse[:n]}
    if "query_to_query" in directions:
        stats["query_to_query"], _ = similarity_logsumexp(
            query, query, scale, normalize=normalize, exclude_diagonal=True,
            positives=no_positive, row_threshold=threshold, backend=backend)
    if "doc_to_doc" in directions:
        rows = torch.arange(n, device=query.device)
        stats["doc_to_doc"], _ = similarity_logsumexp(
            d_pos, docs, scale, normalize=normalize, row_groups=rows,
            col_groups=torch.arange(m, device=query.device) % n, positives=no_positive,
            row_threshold=threshold, backend=backend)
    return log_partition(stats, directions, partition_mode) - positive


def log_partition(stats: dict, directions, partition_mode: str) -> Tensor:
    """log Z per row from each chosen direction's logsumexp (``stats[direction]``):
    "joint", the union's logsumexp (the candidate sets are disjoint, so the logaddexp
    of theirs); "per_direction", their mean."""
    chosen = [stats[d] for d in DIRECTIONS if d in directions]
    if partition_mode == "joint":
        log_z = chosen[0]
        for lse in chosen[1:]:
            log_z = torch.logaddexp(log_z, lse)
        return log_z
    return sum(chosen) / len(chosen)


# --- public function -----------------------------------------------------------------

@_checks.outside_autocast
def multiple_negatives_loss(query: Tensor, docs, *, logit_scale=20.0,
                            directions=("query_to_doc",), partition_mode: str = "joint",
                            false_negative_margin=None, normalize: bool = True,
                            reduction: str = "mean", backend: str = "auto") -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss on embeddings, without the
    N x N*(1+k) matrix.

    Args:
        query: (N, D) anchors; fp16, bf16, fp32 or fp64.
        docs: (N*(1+k), D), the N positives first, then k blocks of N hard negatives
            (row i of each block belongs to query i); or a list of k+1 (N, D) tensors
            in that order. Same dtype and device as ``query``.
        logit_scale: the multiplier ``s`` (their ``scale``), a number or a 0-dim
            tensor that receives its gradient.
        directions: a subset of ("query_to_doc", "query_to_query", "doc_to_query",
            "doc_to_doc"); "query_to_doc" is required.
        partition_mode: "joint" (one softmax over every chosen direction) or
            "per_direction" (the mean of each direction's loss; not with the
            query_to_query / doc_to_doc directions).
        false_negative_margin: None, or m: candidates with a logit above the
            positive's logit + m leave every denominator (the positive never does).
            In logit units (after ``logit_scale``).
        normalize: True for cos_sim, False for dot_score.
        reduction: "mean" (theirs), "sum", or "none" for the (N,) per-query losses.
        backend: "auto" or a backend name; the self-directions and the margin need
            a backend with the masked primitive (naive, torch, cpu, ...).

    Returns:
        fp32 loss (fp64 for fp64 inputs); gradients in the input dtype.
    """
    docs = _docs_matrix(query, docs)
    directions = _check_directions(directions, partition_mode)
    margin = check_margin(false_negative_margin)
    _checks.check_reduction(reduction)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    name = backends.select_backend(backend, query.device)
    if margin is not None or set(directions) & set(_SELF_DIRECTIONS):
        masked_logsumexp.masked_backend(backend, query.device)  # its error before any kernel
    scale = _checks.as_scalar_tensor("logit_scale", logit_scale, query)
    args = (query, docs, scale, directions, partition_mode, margin, normalize)
    if name == "naive":
        return reduce_losses(_reference_per_row(*args), reduction)
    return reduce_losses(_per_row(*args, backend), reduction)
