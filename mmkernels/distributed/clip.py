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
block's complete column statistics home. The backward does the same with the
primitive's backward kernel. The schedule (sends overlapped with the tiles,
statistics and accumulators one step behind their block) is the ring of the
primitive shared with the embedding loss: mmkernels/distributed/_lse_ring.py.
Per rank: a few (n, D) buffers and a tile, whatever W.

``gather`` (memory O(N * D) per rank). Both feature matrices are all-gathered
with gradient, and each rank runs the single-process tiled primitive for its
own rows: ``a_r`` against all texts (row statistics) and ``b_r`` against all
images (column statistics), i.e. 2 * n_r * N * D multiply-adds per rank
against the ring's n_r * N * D, with no overlap; simpler, and the choice for
the naive (materializing) backend, which has no kernels a ring could use.

Options
-------
``false_negative_margin``, ``groups`` (``group_mode``) and ``debias_tau_plus``
are those of the single-process loss (mmkernels/ops/contrastive.py, whose
O(n * D) terms are reused as they are) on the global batch; ``groups`` are
global ids, each rank passing those of its own pairs. What crosses ranks:

- the rules of the masked primitive (ops/masked_logsumexp.py) in global terms
  (:class:`_Exclusions`): a pair's partner is its positive only in its own
  rank's block (-1 elsewhere); the margin's thresholds ``S[i, i] + m`` and the
  group ids of every pair come from one all-gather of N numbers each (no
  features), so that a visiting block's column rules are at hand. The
  debiased loss's negatives are the masked primitive with the pairs' global
  indices as groups and no positive: exactly the diagonal leaves;
- ``group_mode="positives"`` (and label smoothing with groups): per pair the
  sum of the other side's rows over its group in the whole batch, by a second
  ring of (n, D) blocks (_autograd.GroupSumOverRanks, its own adjoint in the
  backward), and each group's global size from the gathered ids;
- the debiased loss's floor without normalization: the largest row norm of
  each side over the ranks (an all-gather of 2 numbers per rank).

With ``strategy="gather"`` the same terms come from the gathered features. Per
rank the ring stays O(n_r * D) (plus O(N) numbers), never an N x N tensor.

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

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from mmkernels import _checks, backends
from mmkernels.distributed._autograd import (AllGather, GroupSumOverRanks, LossOverRanks,
                                             SharedScalar, SumOverRanks, gather_rows)
from mmkernels.distributed._kernels import ring_kernels
from mmkernels.distributed._lse_ring import RingLogSumExp, no_rules
from mmkernels.distributed._ring import RankFacts, Ring
from mmkernels.ops import _common
from mmkernels.ops import logsumexp as _lse
from mmkernels.ops import masked_logsumexp as _masked
from mmkernels.ops.contrastive import (GROUP_MODES, Groups, Side, check_groups, check_margin,
                                       check_tau_plus, cross_entropy_from_lse, debiased_losses,
                                       grouped_targets)
from mmkernels.ops.contrastive import contrastive_loss as _single_process_loss
from mmkernels.ops.contrastive import info_nce as _info_nce
from mmkernels.ops.contrastive import pair_losses

STRATEGIES = ("ring", "gather")


# --- checks, done on every rank and agreed on before any features move -------

# Per-rank facts exchanged before the loss runs; a rank whose own inputs are
# invalid sends ok = 0 and raises its own error, the others raise one naming it.
_FIELDS = ("ok", "rows", "D", "dtype", "normalize", "label_smoothing", "strategy",
           "needs_grad", "scale_needs_grad", "image_needs_grad", "text_needs_grad",
           "has_margin", "margin", "has_groups", "group_mode", "has_tau_plus", "tau_plus",
           "logit_scale")


class _Agreed(NamedTuple):
    """What :func:`_agree` checked and the ranks agreed on."""
    ring: Ring
    scale: Tensor
    backend: str
    image_trains: bool  # some rank's image (text) features require grad: that side's
    text_trains: bool   # products, and the collectives it feeds, run on every rank
    margin: Optional[float]
    groups: Optional[Tensor]
    tau_plus: Optional[float]


def _agree(group, image_features, text_features, logit_scale, *, strategy, normalize,
           label_smoothing, backend, claimed=None, false_negative_margin=None, groups=None,
           group_mode="positives", debias_tau_plus=None) -> _Agreed:
    """Check the inputs on this rank, exchange what the ranks must agree on, and raise
    the same error on every rank when something is wrong.

    ``claimed``: (rank, world_size) as a caller was configured (ClipLoss), checked
    against the group. A side "trains" when some rank's features of that side
    require grad (else no rank's backward needs its products: a frozen tower).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("mmkernels.distributed: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (or use "
                           "mmkernels.contrastive_loss on one process)")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    error, scale, name, margin, tau_plus = None, None, None, None, None
    try:
        if claimed is not None and tuple(claimed) != (rank, size):
            raise ValueError(f"ClipLoss: rank={claimed[0]}, world_size={claimed[1]}, but the "
                             f"process group has this process as rank {rank} of {size}")
        _checks.check_pair("image_features", image_features, "text_features", text_features,
                           same_rows=True)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        _checks.check_label_smoothing(label_smoothing)
        margin = check_margin(false_negative_margin, label_smoothing)
        groups = check_groups(groups, group_mode, image_features.shape[0], image_features.device,
                              "one global group id per local pair", margin)
        # N >= 2 is the global batch's condition: checked once the ranks agree on N.
        tau_plus = check_tau_plus(debias_tau_plus, 2, label_smoothing=label_smoothing,
                                  margin=margin, groups=groups)
        name = backends.select_backend(backend, image_features.device)
        if strategy == "ring" and name == "naive":
            raise ValueError("strategy='ring' needs a tiled backend's kernels, and the 'naive' "
                             "backend materializes S instead: use strategy='gather' with it")
        if _masked_rules_on(margin, groups, group_mode, tau_plus):
            name = _masked.masked_backend(backend, image_features.device)
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
                 float(grad_on and image_features.requires_grad),
                 float(grad_on and text_features.requires_grad),
                 float(margin is not None), margin or 0.0, float(groups is not None),
                 GROUP_MODES.index(group_mode), float(tau_plus is not None), tau_plus or 0.0]
    shared = RankFacts.share(facts, scale, _FIELDS, device, group, error)
    _check_agreement(shared)
    table = shared.table
    ring = Ring(group, rank, size, tuple(int(row["rows"]) for row in table))
    if tau_plus is not None:  # the same N on every rank: the same error everywhere
        check_tau_plus(tau_plus, ring.total, label_smoothing=0.0, margin=None, groups=None)
    return _Agreed(ring, scale, name, any(row["image_needs_grad"] for row in table),
                   any(row["text_needs_grad"] for row in table), margin, groups, tau_plus)


def _masked_rules_on(margin, groups, group_mode, tau_plus) -> bool:
    """Whether the loss's logsumexps leave entries out (the masked primitive's kernels)."""
    return (margin is not None or tau_plus is not None
            or (groups is not None and group_mode == "exclude"))


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
    if differs("has_groups"):
        raise ValueError(f"groups: given on some ranks and not on others "
                         f"({per_rank('has_groups', bool)}); every rank must pass the group ids "
                         "of its own pairs, or none")
    settings = [("strategy", "strategy"), ("normalize", "normalize"),
                ("label_smoothing", "label_smoothing"), ("has_margin", "false_negative_margin"),
                ("margin", "false_negative_margin"), ("has_tau_plus", "debias_tau_plus"),
                ("tau_plus", "debias_tau_plus"), ("logit_scale", "logit_scale")]
    if facts.table[0]["has_groups"]:
        settings.append(("group_mode", "group_mode"))
    shows = {"strategy": lambda v: STRATEGIES[int(v)], "group_mode": lambda v: GROUP_MODES[int(v)],
             "has_margin": bool, "has_tau_plus": bool}
    for field, what in settings:
        if differs(field):
            raise ValueError(f"{what}: differs across ranks "
                             f"({per_rank(field, shows.get(field, lambda v: v))}); every rank "
                             "must compute the same loss")
    if differs("needs_grad") or differs("scale_needs_grad"):
        raise ValueError("mmkernels.distributed: some ranks need gradients and others do not "
                         f"(features or logit_scale requiring grad: {per_rank('needs_grad', bool)}; "
                         f"logit_scale: {per_rank('scale_needs_grad', bool)}); the backward is "
                         "collective, so every rank must take part in it")


def _taking_part(x: Tensor, trains: bool) -> Tensor:
    """``x``, made part of this rank's graph when the side it comes from trains on some
    rank (``trains``), so that the backward of a collective it feeds runs on every
    rank or on none (a rank whose side is frozen just drops its gradient)."""
    if trains and torch.is_grad_enabled() and not x.requires_grad:
        return x.detach().requires_grad_()
    return x


# --- the rules of the masked primitive, in global terms ------------------------

class _Exclusions:
    """Which entries of the global S leave the logsumexps of this rank's pairs (rows
    and columns alike), as the masked primitive takes them for each strategy.

    ``own_positive``: pair i's partner is its positive (never excluded), else no
    entry is exempt (the debiased loss's negatives). ``ids`` (N,), every pair's in
    rank order: entries of equal ids leave (a group's other members; with the pairs'
    global indices, the diagonal). ``home_thresholds`` (n,): ``S[i, i] + m`` of this
    rank's pairs; S[i, j] above row i's (column j's) threshold leaves row i (column
    j). ``thresholds`` (N,): every pair's, for the ring's visiting blocks."""

    def __init__(self, ring: Ring, n: int, device, *, own_positive: bool, ids=None,
                 home_thresholds=None, thresholds=None):
        self.ring, self.own_positive, self.ids = ring, own_positive, ids
        self.home_thresholds, self.thresholds = home_thresholds, thresholds
        self.home_ids = None if ids is None else self._of(ids, ring.rank)
        self.own = torch.arange(n, device=device)
        self.none = torch.full((n,), -1, dtype=torch.int64, device=device)

    def _of(self, values: Tensor, v: int) -> Tensor:
        """Rank v's entries of a global (N,) vector."""
        start = sum(self.ring.sizes[:v])
        return values[start:start + self.ring.sizes[v]]

    def block(self, v: int) -> tuple:
        """The masked kernels' six rules for this rank's rows against the block of rank v."""
        positives = self.own if self.own_positive and v == self.ring.rank else self.none
        col_groups = None if self.ids is None else self._of(self.ids, v)
        col_threshold = None if self.thresholds is None else self._of(self.thresholds, v)
        return (False, positives, self.home_ids, col_groups, self.home_thresholds, col_threshold)

    def against_all(self) -> dict:
        """similarity_logsumexp's rules for this rank's rows against the whole batch (as
        rows of S for the images, of S.T for the texts: the rules are symmetric)."""
        positives = self.ring.offset + self.own if self.own_positive else self.none
        return dict(positives=positives, row_groups=self.home_ids, col_groups=self.ids,
                    row_threshold=self.home_thresholds)


# --- the strategies: how this rank's pairs meet the global batch -----------------

class _SideOverRanks(Side):
    """This rank's rows of one side, whose sums run over the rows of every rank (the
    O(n * D) terms of ops/contrastive.py read a side through these two methods)."""

    def __init__(self, x: Tensor, normalize: bool, ring: Ring, trains: bool):
        super().__init__(x, normalize)
        self.ring, self.trains = ring, trains

    def total(self) -> Tensor:
        return SumOverRanks.apply(_taking_part(super().total(), self.trains), self.ring)

    def group_totals(self, groups: "_HomeGroups") -> Tensor:
        """Row i: the sum of Xh_j over the global rows j of pair i's group."""
        rows = self.x if self.r is None else self.x * self.r.unsqueeze(1)
        return GroupSumOverRanks.apply(_taking_part(rows, self.trains), groups.home_ids,
                                       groups.ids, self.ring)


class _HomeGroups:
    """The groups of this rank's pairs as ops/contrastive.py's ``Groups`` gives them:
    row i's slot is its own (``index``), ``size`` its group's size in the global batch."""

    def __init__(self, home_ids: Tensor, ids: Tensor, dtype: torch.dtype):
        self.home_ids, self.ids = home_ids, ids
        ordered = torch.sort(ids).values
        self.size = (torch.searchsorted(ordered, home_ids, right=True)
                     - torch.searchsorted(ordered, home_ids)).to(dtype)
        self.index = torch.arange(home_ids.shape[0], device=home_ids.device)


class _Ring:
    """strategy="ring": the statistics by the ring of the primitive, the sums over the
    batch by collectives of (n, D) or (D,) tensors. Memory O(n * D) per rank."""

    def __init__(self, a, b, scale, normalize, agreed: _Agreed):
        self.a, self.b, self.scale, self.normalize, self.agreed = a, b, scale, normalize, agreed

    def statistics(self, rules: Optional[_Exclusions]):
        """(row_lse, col_lse) of this rank's pairs over the global batch, under ``rules``."""
        a, agreed = self.a, self.agreed
        if rules is None:
            kernels, rules_at = ring_kernels("logsumexp", agreed.backend, a.device), no_rules
        else:
            kernels, rules_at = _masked.KERNELS.kernels(agreed.backend, a.device), rules.block
        return RingLogSumExp.apply(a, self.b, self.scale, self.normalize, agreed.ring,
                                   agreed.ring.sizes, rules_at, kernels, True, agreed.text_trains)

    def batch_sides(self):
        """(texts, images) of the whole batch, as the targets sum over them."""
        agreed = self.agreed
        return (_SideOverRanks(self.b, self.normalize, agreed.ring, agreed.text_trains),
                _SideOverRanks(self.a, self.normalize, agreed.ring, agreed.image_trains))

    def group_layout(self, home_ids, ids, dtype):
        """(groups, row_group): the groups the batch sides sum over, this rank's rows' slots."""
        groups = _HomeGroups(home_ids, ids, dtype)
        return groups, groups.index

    def thresholds(self, home: Tensor) -> Tensor:
        """Every pair's threshold (the visiting blocks' column rules): O(N) numbers."""
        return gather_rows(home.unsqueeze(1), self.agreed.ring).squeeze(1).contiguous()


class _Gather(_Ring):
    """strategy="gather": the features all-gathered with gradient, the single-process
    primitive and O(N * D) terms for this rank's rows against them."""

    def __init__(self, a, b, scale, normalize, agreed: _Agreed):
        super().__init__(a, b, scale, normalize, agreed)
        self.all_a = AllGather.apply(_taking_part(a, agreed.image_trains), agreed.ring)
        self.all_b = AllGather.apply(_taking_part(b, agreed.text_trains), agreed.ring)

    def statistics(self, rules: Optional[_Exclusions]):
        a, b, scale, normalize, name = self.a, self.b, self.scale, self.normalize, \
            self.agreed.backend
        if rules is None:
            return (_lse.lse(a, self.all_b, scale, normalize, name)[0],
                    _lse.lse(b, self.all_a, scale, normalize, name)[0])
        rules = rules.against_all()
        return (_lse.similarity_logsumexp(a, self.all_b, scale, normalize=normalize,
                                          backend=name, **rules)[0],
                _lse.similarity_logsumexp(b, self.all_a, scale, normalize=normalize,
                                          backend=name, **rules)[0])

    def batch_sides(self):
        return Side(self.all_b, self.normalize), Side(self.all_a, self.normalize)

    def group_layout(self, home_ids, ids, dtype):
        groups = Groups(ids, dtype)
        offset = self.agreed.ring.offset
        return groups, groups.index[offset:offset + home_ids.shape[0]]

    def thresholds(self, home: Tensor):
        return None  # the rows against the whole batch need only their own


# --- the loss ------------------------------------------------------------------

def _per_pair(strategy: _Ring, a, b, scale, normalize, label_smoothing, group_mode,
              agreed: _Agreed) -> Tensor:
    """The per-pair losses of this rank's pairs in the global batch (ops/contrastive.py's
    terms, the sums and rules over the batch from ``strategy``)."""
    ring, n = agreed.ring, a.shape[0]
    total = ring.total
    positive = scale * Side(a, normalize).dot(Side(b, normalize))  # S[i, i]
    home_thresholds = thresholds = None
    if agreed.margin is not None:
        home_thresholds = (positive.detach() + agreed.margin).contiguous()
        thresholds = strategy.thresholds(home_thresholds)

    if agreed.tau_plus is not None:
        # The negatives: every entry but the diagonal (the pairs' global indices as groups).
        indices = torch.arange(total, device=a.device)
        rules = _Exclusions(ring, n, a.device, own_positive=False, ids=indices)
        neg_row, neg_col = strategy.statistics(rules)
        row_floor, col_floor = _logit_floors(a, b, scale, normalize, agreed)
        return (debiased_losses(positive, neg_row, row_floor, agreed.tau_plus, total - 1)
                + debiased_losses(positive, neg_col, col_floor, agreed.tau_plus, total - 1)) / 2

    if agreed.groups is None:
        rules = None
        if agreed.margin is not None:
            rules = _Exclusions(ring, n, a.device, own_positive=True,
                                home_thresholds=home_thresholds, thresholds=thresholds)
        row_lse, col_lse = strategy.statistics(rules)
        trains = agreed.image_trains or agreed.text_trains  # (either side's total comes here)
        return pair_losses(a, b, row_lse, col_lse, scale, normalize, label_smoothing, n=total,
                           batch_sum=lambda v: SumOverRanks.apply(_taking_part(v, trains), ring))

    ids = gather_rows(agreed.groups.unsqueeze(1), ring).squeeze(1).contiguous()
    rules = None
    if group_mode == "exclude":
        rules = _Exclusions(ring, n, a.device, own_positive=True, ids=ids,
                            home_thresholds=home_thresholds, thresholds=thresholds)
    row_lse, col_lse = strategy.statistics(rules)
    groups, row_group = strategy.group_layout(agreed.groups, ids, positive.dtype)
    per_direction = []
    for x, y, stat in zip((Side(a, normalize), Side(b, normalize)), strategy.batch_sides(),
                          (row_lse, col_lse)):
        target, smooth = grouped_targets(x, y, groups, row_group, positive, scale, group_mode,
                                         label_smoothing, total)
        per_direction.append(cross_entropy_from_lse(stat, target, label_smoothing, smooth))
    return (per_direction[0] + per_direction[1]) / 2


def _logit_floors(a, b, scale, normalize, agreed: _Agreed):
    """ops/contrastive.py's lower bounds of each row's and column's logits, with the
    other side's largest norm over every rank's rows."""
    bound = scale.abs()
    if normalize:
        return -bound, -bound
    norm_a, norm_b = _common.row_norms(a), _common.row_norms(b)
    largest = torch.stack([norm_a.max(), norm_b.max()]).unsqueeze(0)
    largest = AllGather.apply(_taking_part(largest, agreed.image_trains or agreed.text_trains),
                              agreed.ring).amax(0)
    return -bound * norm_a * largest[1], -bound * norm_b * largest[0]


def _global_loss(image_features, text_features, logit_scale, *, group, strategy, normalize,
                 label_smoothing, backend, gather_with_grad: bool, claimed=None,
                 false_negative_margin=None, groups=None, group_mode="positives",
                 debias_tau_plus=None) -> Tensor:
    """The global-batch loss on every rank. Feature gradients: W * dL/dx with
    ``gather_with_grad`` (open_clip's gather_with_grad=True), dL/dx without."""
    agreed = _agree(group, image_features, text_features, logit_scale, strategy=strategy,
                    normalize=normalize, label_smoothing=label_smoothing, backend=backend,
                    claimed=claimed, false_negative_margin=false_negative_margin, groups=groups,
                    group_mode=group_mode, debias_tau_plus=debias_tau_plus)
    ring, scale = agreed.ring, agreed.scale
    if ring.size == 1:
        return _single_process_loss(image_features, text_features, scale, normalize=normalize,
                                    label_smoothing=label_smoothing,
                                    false_negative_margin=agreed.margin, groups=agreed.groups,
                                    group_mode=group_mode, debias_tau_plus=agreed.tau_plus,
                                    backend=agreed.backend)
    multiplier = float(ring.size) if gather_with_grad else 1.0
    if scale.requires_grad:
        scale = SharedScalar.apply(scale, ring, multiplier)
    by = (_Ring if strategy == "ring" else _Gather)(image_features, text_features, scale,
                                                    normalize, agreed)
    per_pair = _per_pair(by, image_features, text_features, scale, normalize, label_smoothing,
                         group_mode, agreed)
    return LossOverRanks.apply(per_pair.sum() / ring.total, ring, multiplier)


@_checks.outside_autocast
def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale=1.0, *,
                     group=None, strategy: str = "ring", normalize: bool = False,
                     label_smoothing: float = 0.0, false_negative_margin=None,
                     groups: Tensor | None = None, group_mode: str = "positives",
                     debias_tau_plus=None, backend: str = "auto") -> Tensor:
    """Symmetric CLIP loss of the global batch spread over a process group.

    Each rank passes its own shard (shards may differ in size); every rank
    returns the loss of the whole global batch (the shards concatenated in
    rank order), equal to :func:`mmkernels.contrastive_loss` on it, with the
    same options. Gradients are those of open_clip's
    ``ClipLoss(gather_with_grad=True)``: each rank's feature gradient is
    ``world_size * dL/d(local features)`` and logit_scale gets ``dL/dscale``,
    so DDP's averaging yields exactly the single-process full-batch gradient.
    Collective: every rank must call it, and backpropagate through it, with
    the same settings.

    Args:
        image_features, text_features: this rank's (local_N, D) shard; same
            dtype (fp16, bf16, fp32, fp64) and device; the same D and dtype on
            every rank.
        logit_scale: the multiplier (already exponentiated), a number or a
            0-dim tensor that receives its gradient; the same on every rank.
        group: the process group (default: the default group).
        strategy: "ring" (point-to-point ring, memory O(local_N * D) per rank,
            plus O(global_N) numbers with a margin or groups) or "gather"
            (all-gather of the features, O(global_N * D)).
        normalize, label_smoothing: as in :func:`mmkernels.contrastive_loss`.
        false_negative_margin: None, or m, as in :func:`mmkernels.contrastive_loss`
            on the global batch (pair i's threshold ``S[i, i] + m`` holds for its
            row and column against every rank's pairs); the same on every rank.
        groups: None, or this rank's (local_N,) int64 group ids, global: pairs of
            equal ids are in one group whatever their ranks (the global batch's
            ids are the ranks' concatenated in rank order); given on every rank
            or on none.
        group_mode: "positives" or "exclude", as in :func:`mmkernels.contrastive_loss`.
        debias_tau_plus: None, or tau+ in [0, 1): the debiased loss of the global
            batch (needs global N >= 2); as in :func:`mmkernels.contrastive_loss`,
            not with label_smoothing, false_negative_margin or groups.
        backend: the kernels for the tiles, "auto" (the best for the tensors'
            device) or a backend name; "naive" only with strategy="gather".

    Returns:
        The global-batch mean loss, fp32 (fp64 for fp64 inputs), on every rank.

    Raises:
        ValueError/TypeError on every rank when any rank's inputs are invalid
        (each option's own errors, and groups of a length other than local_N,
        as on one process), or when D, dtype, logit_scale or a setting differs
        across ranks, or groups are given on some ranks only.
    """
    return _global_loss(image_features, text_features, logit_scale, group=group,
                        strategy=strategy, normalize=normalize, label_smoothing=label_smoothing,
                        backend=backend, gather_with_grad=True,
                        false_negative_margin=false_negative_margin, groups=groups,
                        group_mode=group_mode, debias_tau_plus=debias_tau_plus)


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
    agreed = _agree(group, image_features, text_features, logit_scale, strategy="gather",
                    normalize=False, label_smoothing=0.0, backend=backend, claimed=claimed)
    ring, scale, name = agreed.ring, agreed.scale, agreed.backend
    if gather_with_grad:
        all_image, all_text = (AllGather.apply(x, ring) for x in (image_features, text_features))
    else:
        with torch.no_grad():
            all_image, all_text = (gather_rows(x, ring) for x in (image_features, text_features))
    labels = ring.offset + torch.arange(ring.sizes[ring.rank], device=image_features.device)
    image_to_text = _info_nce(image_features, all_text, labels, scale, backend=name)
    text_to_image = _info_nce(text_features, all_image, labels, scale, backend=name)
    return (image_to_text + text_to_image) / 2
