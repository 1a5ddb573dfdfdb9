r"""Contrastive losses as thin compositions of the logsumexp primitive.

Maths
-----
With ``S = scale * Ah @ Bh.T`` (N, M) and label smoothing ``eps``, the
cross-entropy of row i with target t is::

    CE_i = (1 - eps) * (lse_i - S[i, t]) + eps * (lse_i - mean_j S[i, j])
         = lse_i - (1 - eps) * S[i, t] - eps * mean_j S[i, j]

``lse_i`` is the primitive (mmkernels/ops/logsumexp.py). The other two terms
are O(N*D) and stay in plain autograd:

    S[i, t]          = scale * <Ah_i, Bh_t>
    mean_j S[i, j]   = scale * <Ah_i, sum_j Bh_j> / M

contrastive_loss (symmetric CLIP, M = N, t = i) averages the image-to-text
(row) and text-to-image (column) cross-entropies per pair; info_nce is the
row direction alone with arbitrary labels. Equal to open_clip's ClipLoss and
to ``F.cross_entropy`` on the materialized S, which is what the naive
backend computes.

Groups
------
``groups`` gives each pair (contrastive_loss) or each key (info_nce) a group
id; ``G(i)`` is the group of row i (for info_nce, the group of its positive key
``labels[i]``), i's own partner included. Two modes:

- ``"positives"`` (multi-positive CLIP): the members of G(i) are all positives of
  row i, equally weighted: the cross-entropy against the uniform target on G(i)::

      l_i2t[i] = row_lse[i] - mean_{j in G(i)} S[i, j]
      l_t2i[j] = col_lse[j] - mean_{i in G(j)} S[i, j]

  The group mean is O(N*D): ``sum_{j in G(i)} S[i, j] = scale * <Ah_i, T[g(i)]>``
  with ``T[g] = sum_{j in g} Bh_j``, the rows summed per group (one index_add).
- ``"exclude"`` (duplicated captions or images): row i keeps its partner as its only
  positive, and the other members of G(i) leave its denominator (the masked
  primitive, mmkernels/ops/masked_logsumexp.py, with row and column groups)::

      l_i2t[i] = log sum_{j = i or j not in G(i)} exp S[i, j] - S[i, i]    (columns alike)

With label smoothing the target is ``1 - eps`` on the positives (as above) and
``eps`` spread uniformly over the softmax's candidates: all M of them with
"positives", the ``M - |G(i)| + 1`` left with "exclude", whose logit sum is
``scale * <Ah_i, sum_j Bh_j - T[g(i)]> + S[i, i]``: O(N*D) again. Singleton
groups are the plain loss in both modes.

Debiased contrastive loss
-------------------------
Chuang et al. (2020), "Debiased Contrastive Learning": with a class prior tau+
(the chance that a "negative" is in fact a positive), row i's sum of negatives
is replaced by an estimate of the true negatives' sum. With ``M = N - 1``
negatives, ``pos = exp S[i, i]`` and ``neg = sum_{j != i} exp S[i, j]``::

    Ng_i     = max((neg - tau+ * M * pos) / (1 - tau+),  M * exp(floor_i))
    l_i2t[i] = log(pos + Ng_i) - S[i, i]                     (columns alike)

``floor_i`` is a lower bound of every logit of row i, so that the clamp is the
smallest value the negatives' sum can take: ``-|scale|`` with normalized
features (the paper's ``e^{-1/t}``, |cos| <= 1) and, by Cauchy-Schwarz,
``-|scale| * ||a_i|| * max_j ||b_j||`` without normalization. It follows the
current scale and norms and is differentiated like the rest: a learnable scale
gets the exact gradient of this loss. ``neg`` is the primitive with the diagonal
excluded; everything is in log space (``log Ng = max(log neg + log(1 - e^u) -
log(1 - tau+), log M + floor_i)`` with ``u = log(tau+ * M) + S[i, i] - log neg``;
the estimate is not positive where ``u >= 0``), so scale 100 does not overflow.
With tau+ = 0 it is the plain loss (the floor never binds).

Numerics
--------
The O(N*D) terms are computed in fp32 (fp64 for fp64 inputs) from the raw
features and the (N,) inverse norms, never from normalized N x D copies, so
for fp32 inputs autograd saves nothing of size N x D beyond the inputs (the
group sums are the exception: an (N, D) tensor per direction). The loss is fp32
whatever the input dtype; gradients come back in the input dtype.

Shared within the package
-------------------------
The distributed loss (mmkernels/distributed/clip.py) computes these same terms
for each rank's pairs, and the embedding losses (ops/embedding.py,
distributed/embedding.py) their positives, through these names, which are not
part of the public API (mmkernels/__init__.py):

- ``Side``: one side's rows and inverse norms; the O(N*D) terms read a side only
  through its methods (``dot``, ``total``, ``dot_vector``, ``dot_rows``,
  ``group_totals``), so the distributed loss subclasses it to sum over ranks;
- ``Groups``: group ids renumbered (``index``) and group sizes (``size``), the two
  fields the distributed loss's own groups also provide;
- ``grouped_targets``, ``cross_entropy_from_lse``: one direction's target and
  smoothing logits with groups, and its cross-entropy from its logsumexp;
- ``debiased_losses``: one direction's debiased loss from the logsumexp of its
  negatives and its logit floor;
- ``pair_losses``, ``reduce_losses``, ``GROUP_MODES`` and the argument checks
  ``check_margin``, ``check_groups``, ``check_tau_plus``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkernels import _checks, backends
from mmkernels.ops import _common, masked_logsumexp
from mmkernels.ops.logsumexp import lse, similarity_logsumexp, similarity_matrix

GROUP_MODES = ("positives", "exclude")


class Side:
    """One side's features as the O(N*D) terms use them: the raw rows in the
    compute dtype (no copy for fp32) and, when normalizing, their inverse
    norms (differentiable), so that Xh = r * x is never formed."""

    def __init__(self, x: Tensor, normalize: bool):
        self.x = x.to(_checks.compute_dtype(x.dtype))
        self.r = _common.inv_norms(x) if normalize else None

    def dot(self, other: "Side", rows: Tensor | None = None) -> Tensor:
        """<Xh_i, Yh_i> (or <Xh_i, Yh_rows[i]>) per row."""
        y = other.x if rows is None else other.x[rows]
        out = torch.linalg.vecdot(self.x, y)
        if self.r is not None:
            out = out * self.r * (other.r if rows is None else other.r[rows])
        return out

    def total(self) -> Tensor:
        """sum_j Xh_j, shape (D,): a matrix-vector product, no N x D temporary."""
        return self.x.sum(0) if self.r is None else self.r @ self.x

    def dot_vector(self, v: Tensor) -> Tensor:
        """<Xh_i, v> per row."""
        out = self.x @ v
        return out if self.r is None else out * self.r

    def dot_rows(self, m: Tensor) -> Tensor:
        """<Xh_i, m_i> per row, for an (N, D) ``m``."""
        out = torch.linalg.vecdot(self.x, m)
        return out if self.r is None else out * self.r

    def group_totals(self, groups: "Groups") -> Tensor:
        """T[g] = sum of Xh_j over the rows j of group g, shape (rows, D); the rows
        past the last group are 0."""
        rows = self.x if self.r is None else self.x * self.r.unsqueeze(1)
        return rows.new_zeros(rows.shape).index_add(0, groups.index, rows)


class Groups:
    """Group ids renumbered 0, 1, ... in order of value (``index``, one per row) and
    the size of each group (``size``, in ``dtype``, indexed by the new ids). Found by
    a sort: static shapes, no host sync."""

    def __init__(self, ids: Tensor, dtype: torch.dtype):
        values, order = torch.sort(ids, stable=True)
        first = torch.ones_like(values, dtype=torch.bool)  # where a new group starts
        first[1:] = values[1:] != values[:-1]
        self.index = torch.empty_like(ids).scatter_(0, order, first.cumsum(0) - 1)
        self.size = torch.zeros(ids.shape[0], dtype=dtype, device=ids.device).index_add_(
            0, self.index, torch.ones(ids.shape[0], dtype=dtype, device=ids.device))


def reduce_losses(per_row: Tensor, reduction: str) -> Tensor:
    """The losses of the rows under ``reduction`` (checked): their mean, their sum, or
    themselves for "none"."""
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def cross_entropy_from_lse(row_lse: Tensor, target: Tensor, label_smoothing: float,
                           smooth: Tensor | None) -> Tensor:
    """One direction's cross-entropy ``lse - (1 - eps) * target - eps * smooth``:
    ``target`` the mean logit of the row's positives, ``smooth`` the mean logit of
    its softmax's candidates (unused without smoothing)."""
    if not label_smoothing:
        return row_lse - target
    return row_lse - (1.0 - label_smoothing) * target - label_smoothing * smooth


# --- checks ------------------------------------------------------------------------

def _check_common(logit_scale, label_smoothing, reduction, like):
    _checks.check_label_smoothing(label_smoothing)
    _checks.check_reduction(reduction)
    return _checks.as_scalar_tensor("logit_scale", logit_scale, like)


def check_margin(false_negative_margin, label_smoothing=0.0):
    """None, or the margin as a float; raises naming ``false_negative_margin``."""
    if false_negative_margin is None:
        return None
    if isinstance(false_negative_margin, bool) or not isinstance(false_negative_margin,
                                                                 numbers.Real):
        raise TypeError(f"false_negative_margin: expected a number or None, got "
                        f"{type(false_negative_margin).__name__}")
    if math.isnan(false_negative_margin):
        raise ValueError("false_negative_margin: got NaN")
    if label_smoothing:
        # smoothing's mean over a row would take the dropped logits back in
        raise ValueError(f"false_negative_margin: not combined with label_smoothing "
                         f"(got {label_smoothing})")
    return float(false_negative_margin)


def check_groups(groups, group_mode, length: int, device: torch.device, meaning: str,
                 margin=None):
    """None, or ``groups`` as a contiguous (length,) int64 tensor; raises naming
    ``groups``, ``group_mode`` or, for a margin with "positives", both."""
    if group_mode not in GROUP_MODES:
        raise ValueError(f"group_mode: expected one of {GROUP_MODES}, got {group_mode!r}")
    if groups is None:
        return None
    if isinstance(groups, torch.Tensor) and groups.shape != (length,):
        raise ValueError(f"groups: expected shape ({length},), {meaning}; "
                         f"got {tuple(groups.shape)}")
    groups = masked_logsumexp._index_vector("groups", groups, length, device)
    if margin is not None and group_mode == "positives":
        # the margin would drop a group's other positives from the denominator
        # while they stay in the target: the loss could go below 0
        raise ValueError("false_negative_margin: not combined with groups in "
                         "group_mode='positives'; use group_mode='exclude'")
    return groups


def check_tau_plus(debias_tau_plus, n: int, *, label_smoothing, margin, groups):
    """None, or tau+ as a float in [0, 1); raises naming ``debias_tau_plus``."""
    if debias_tau_plus is None:
        return None
    if isinstance(debias_tau_plus, bool) or not isinstance(debias_tau_plus, numbers.Real):
        raise TypeError(f"debias_tau_plus: expected a number or None, got "
                        f"{type(debias_tau_plus).__name__}")
    tau_plus = float(debias_tau_plus)
    if not 0.0 <= tau_plus < 1.0:  # NaN fails too
        raise ValueError(f"debias_tau_plus: expected a class prior in [0, 1), got {tau_plus}")
    if n < 2:
        raise ValueError(f"debias_tau_plus: needs N >= 2 pairs (each row has N - 1 negatives), "
                         f"got N = {n}")
    # Each of these changes which candidates are negatives (or the target), which
    # the estimate (neg - tau+ * M * pos) / (1 - tau+) with M = N - 1 does not model.
    for name, given in (("label_smoothing", bool(label_smoothing)),
                        ("false_negative_margin", margin is not None),
                        ("groups", groups is not None)):
        if given:
            raise ValueError(f"debias_tau_plus: not combined with {name}")
    return tau_plus


# --- contrastive_loss ----------------------------------------------------------------

@_checks.outside_autocast
def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale=1.0, *,
                     normalize: bool = False, label_smoothing: float = 0.0,
                     reduction: str = "mean", false_negative_margin=None,
                     groups: Tensor | None = None, group_mode: str = "positives",
                     debias_tau_plus=None, backend: str = "auto") -> Tensor:
    """Symmetric CLIP loss without the N x N matrix.

    Equals ``(F.cross_entropy(S, arange(N), label_smoothing=ls) +
    F.cross_entropy(S.T, arange(N), label_smoothing=ls)) / 2`` with
    ``S = logit_scale * image_features @ text_features.T``: exactly open_clip's
    ``ClipLoss()(image_features, text_features, logit_scale)``.

    Args:
        image_features, text_features: (N, D) each; same dtype (fp16, bf16,
            fp32, fp64) and device.
        logit_scale: the multiplier itself (already exponentiated), a number
            or a 0-dim tensor that receives its gradient.
        normalize: L2-normalize the features first (fused into the kernels).
        label_smoothing: in [0, 1), as in F.cross_entropy.
        reduction: "mean" (default), "sum", or "none" for the (N,) per-pair
            losses ``(l_i2t[i] + l_t2i[i]) / 2``.
        false_negative_margin: None, or m: an entry with ``S[i, j] > S[i, i] + m``
            leaves row i's softmax, one with ``S[i, j] > S[j, j] + m`` column j's
            (logit units; the positives stay). Not with label_smoothing.
        groups: None, or (N,) int64 group ids of the pairs (module docstring,
            "Groups"); with ``group_mode="positives"`` the pairs of a group are
            positives of each other (row loss ``lse_i - mean_{j in G(i)} S[i, j]``,
            both directions); with ``"exclude"`` each pair keeps its own partner
            as positive and the other members of its group leave its denominators.
            The margin goes with "exclude" only.
        group_mode: "positives" (default) or "exclude".
        debias_tau_plus: None, or tau+ in [0, 1): the debiased loss of Chuang et
            al. (2020) with this class prior (module docstring); needs N >= 2,
            not with label_smoothing, false_negative_margin or groups.
        backend: "auto" or a backend name (see :mod:`mmkernels.backends`).

    Returns:
        fp32 loss (fp64 for fp64 inputs); gradients in the input dtype.
    """
    _checks.check_pair("image_features", image_features, "text_features", text_features,
                       same_rows=True)
    n, device = image_features.shape[0], image_features.device
    name = backends.select_backend(backend, device)
    scale = _check_common(logit_scale, label_smoothing, reduction, image_features)
    margin = check_margin(false_negative_margin, label_smoothing)
    groups = check_groups(groups, group_mode, n, device, "one group per pair", margin)
    tau_plus = check_tau_plus(debias_tau_plus, n, label_smoothing=label_smoothing,
                              margin=margin, groups=groups)
    args = (image_features, text_features, scale, normalize)
    if tau_plus is not None:
        masked_logsumexp.masked_backend(backend, device)  # its error before any kernel
        return reduce_losses(_debiased_pair_losses(*args, tau_plus, backend), reduction)
    if groups is not None:
        if group_mode == "exclude":
            masked_logsumexp.masked_backend(backend, device)
        return reduce_losses(_grouped_pair_losses(*args, label_smoothing, groups, group_mode, margin,
                                                  name, backend), reduction)
    if margin is not None:
        positive = scale * Side(image_features, normalize).dot(Side(text_features, normalize))
        threshold = positive.detach() + margin
        row_lse, col_lse = similarity_logsumexp(image_features, text_features, scale,
                                                normalize=normalize, row_threshold=threshold,
                                                col_threshold=threshold, backend=backend)
        return reduce_losses(pair_losses(image_features, text_features, row_lse, col_lse, scale,
                                         normalize, 0.0, n=row_lse.shape[0]), reduction)
    if name == "naive":
        return _naive_contrastive(image_features, text_features, scale, normalize,
                                  label_smoothing, reduction)

    row_lse, col_lse = lse(image_features, text_features, scale, normalize, name)
    return reduce_losses(pair_losses(image_features, text_features, row_lse, col_lse, scale, normalize,
                                     label_smoothing, n=row_lse.shape[0]), reduction)


def pair_losses(image_features, text_features, row_lse, col_lse, scale, normalize,
                label_smoothing, *, n: int, batch_sum=lambda v: v) -> Tensor:
    """The (N,) per-pair losses ``(l_i2t[i] + l_t2i[i]) / 2`` from the pairs' row and
    column logsumexps and the O(N*D) terms. ``n``: the rows of the whole batch;
    ``batch_sum``: a (D,) sum over these rows -> the sum over the whole batch (the
    identity on one process, a sum over ranks in mmkernels.distributed)."""
    img, txt = Side(image_features, normalize), Side(text_features, normalize)
    positive = scale * img.dot(txt)  # S[i, i]
    row_mean = col_mean = None
    if label_smoothing:
        row_mean = scale * img.dot_vector(batch_sum(txt.total())) / n  # mean_j S[i, j]
        col_mean = scale * txt.dot_vector(batch_sum(img.total())) / n  # mean_i S[i, j]
    return (cross_entropy_from_lse(row_lse, positive, label_smoothing, row_mean)
            + cross_entropy_from_lse(col_lse, positive, label_smoothing, col_mean)) / 2


def _naive_contrastive(a, b, scale, normalize, label_smoothing, reduction):
    """open_clip's algorithm: materialize S, cross-entropy both ways."""
    s = similarity_matrix(a, b, scale, normalize)
    labels = torch.arange(s.shape[0], device=s.device)
    per_pair = (F.cross_entropy(s, labels, label_smoothing=label_smoothing, reduction="none")
                + F.cross_entropy(s.T, labels, label_smoothing=label_smoothing, reduction="none")) / 2
    return reduce_losses(per_pair, reduction)


# --- groups ------------------------------------------------------------------------

def grouped_targets(x: Side, y: Side, groups: Groups, row_group: Tensor, positive: Tensor,
                    scale: Tensor, group_mode: str, label_smoothing: float, candidates: int):
    """(target, smooth) of one direction, rows ``x`` against candidates ``y`` (whose
    groups are ``groups``), row i in group ``row_group[i]``, its own positive logit
    ``positive[i]``: the mean logit of the positives and of the softmax's candidates."""
    size = groups.size[row_group]
    group_sum = None  # sum_{j in G(i)} S[i, j]
    if group_mode == "positives" or label_smoothing:
        group_sum = scale * x.dot_rows(y.group_totals(groups)[row_group])
    target = group_sum / size if group_mode == "positives" else positive
    if not label_smoothing:
        return target, None
    all_sum = scale * x.dot_vector(y.total())  # sum_j S[i, j]
    if group_mode == "positives":
        return target, all_sum / candidates
    return target, (all_sum - group_sum + positive) / (candidates - size + 1)


def _grouped_pair_losses(a, b, scale, normalize, label_smoothing, ids, group_mode, margin,
                         name, backend):
    img, txt = Side(a, normalize), Side(b, normalize)
    positive = scale * img.dot(txt)  # S[i, i]
    if group_mode == "positives":
        row_lse, col_lse = lse(a, b, scale, normalize, name)
    else:
        threshold = None if margin is None else positive.detach() + margin
        row_lse, col_lse = similarity_logsumexp(a, b, scale, normalize=normalize, row_groups=ids,
                                                col_groups=ids, row_threshold=threshold,
                                                col_threshold=threshold, backend=backend)
    groups = Groups(ids, positive.dtype)
    n = a.shape[0]
    per_direction = []
    for x, y, stat in ((img, txt, row_lse), (txt, img, col_lse)):
        target, smooth = grouped_targets(x, y, groups, groups.index, positive, scale,
                                         group_mode, label_smoothing, n)
        per_direction.append(cross_entropy_from_lse(stat, target, label_smoothing, smooth))
    return (per_direction[0] + per_direction[1]) / 2


# --- debiased ------------------------------------------------------------------------

def _debiased_pair_losses(a, b, scale, normalize, tau_plus, backend):
    n = a.shape[0]
    positive = scale * Side(a, normalize).dot(Side(b, normalize))  # S[i, i]
    no_positive = torch.full((n,), -1, dtype=torch.int64, device=a.device)
    neg_row, neg_col = similarity_logsumexp(a, b, scale, normalize=normalize,
                                            exclude_diagonal=True, positives=no_positive,
                                            backend=backend)
    row_floor, col_floor = _logit_floors(a, b, scale, normalize)
    return (debiased_losses(positive, neg_row, row_floor, tau_plus, n - 1)
            + debiased_losses(positive, neg_col, col_floor, tau_plus, n - 1)) / 2


def _logit_floors(a, b, scale, normalize):
    """Lower bounds of the logits of each row and of each column:
    ``S[i, j] >= -|scale| * ||Ah_i|| * ||Bh_j||`` (Cauchy-Schwarz), with the
    other side's largest norm; ``-|scale|`` for normalized rows."""
    bound = scale.abs()
    if normalize:
        return -bound, -bound
    norm_a, norm_b = _common.row_norms(a), _common.row_norms(b)
    return -bound * norm_a * norm_b.max(), -bound * norm_b * norm_a.max()


def debiased_losses(positive: Tensor, neg_lse: Tensor, floor: Tensor, tau_plus: float,
                    negatives: int) -> Tensor:
    """``log(pos + Ng) - S[i, i]`` per row, in log space (module docstring)."""
    log_floor = math.log(negatives) + floor
    if tau_plus == 0.0:
        log_estimate = neg_lse
    else:
        u = math.log(tau_plus * negatives) + positive - neg_lse  # log(tau+ * M * pos / neg)
        positive_estimate = u < 0
        u = torch.where(positive_estimate, u, -1.0)  # finite where unused: no NaN gradient
        log_estimate = torch.where(positive_estimate,
                                   neg_lse + _log1mexp(u) - math.log1p(-tau_plus),
                                   float("-inf"))
    log_ng = torch.maximum(log_estimate, log_floor)
    return torch.logaddexp(positive, log_ng) - positive


def _log1mexp(u: Tensor) -> Tensor:
    """``log(1 - e^u)`` for u < 0, accurate at both ends: ``log(-expm1(u))`` near 0,
    ``log1p(-e^u)`` below -log 2 (each branch fed only its own range, so the one
    not taken has a finite gradient)."""
    near = u > -math.log(2.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, u, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, u))))


# --- info_nce ------------------------------------------------------------------------

@_checks.outside_autocast
def info_nce(query: Tensor, keys: Tensor, labels: Tensor | None = None, logit_scale=1.0, *,
             normalize: bool = False, label_smoothing: float = 0.0, reduction: str = "mean",
             false_negative_margin=None, groups: Tensor | None = None,
             group_mode: str = "positives", backend: str = "auto") -> Tensor:
    """One-direction InfoNCE over a rectangular similarity matrix, never held whole.

    Equals ``F.cross_entropy(S, labels, label_smoothing=label_smoothing,
    reduction=reduction)`` with ``S = logit_scale * query @ keys.T`` (N, M).

    Args:
        query: (N, D) features; keys: (M, D), same dtype and device.
        labels: (N,) int64 in [0, M): the positive key of each query. Default
            ``arange(N)`` (needs M >= N: the first N keys pair with the queries).
        logit_scale, normalize, label_smoothing, reduction, backend: as in
            :func:`contrastive_loss`; "none" returns the (N,) per-query losses.
        false_negative_margin: None, or m: keys with ``S[i, j] > S[i, labels[i]] + m``
            leave row i's softmax (logit units; the positive stays). Not with
            label_smoothing.
        groups: None, or (M,) int64 group ids of the keys; query i belongs to the
            group of its positive key ``labels[i]``. With ``group_mode="positives"``
            every key of that group is a positive of query i (row loss
            ``lse_i - mean_{j in G(i)} S[i, j]``); with ``"exclude"`` the other keys
            of the group leave its softmax. The margin goes with "exclude" only.
        group_mode: "positives" (default) or "exclude".

    Returns:
        fp32 loss (fp64 for fp64 inputs); gradients in the input dtype.
    """
    _checks.check_pair("query", query, "keys", keys, same_rows=False)
    n, m = query.shape[0], keys.shape[0]
    if labels is None:
        if m < n:
            raise ValueError(f"labels: the default labels arange(N) need at least N keys; got "
                             f"query {tuple(query.shape)} and keys {tuple(keys.shape)}")
        labels = torch.arange(n, device=query.device)
    else:
        _checks.check_labels(labels, n, m, query.device)
    name = backends.select_backend(backend, query.device)
    scale = _check_common(logit_scale, label_smoothing, reduction, query)
    margin = check_margin(false_negative_margin, label_smoothing)
    groups = check_groups(groups, group_mode, m, query.device,
                          "one group per key (a query takes its positive key's)", margin)
    if groups is not None:
        if group_mode == "exclude":
            masked_logsumexp.masked_backend(backend, query.device)  # its error before any kernel
        return reduce_losses(_grouped_info_nce(query, keys, labels, scale, normalize, label_smoothing,
                                               groups, group_mode, margin, name, backend), reduction)
    if margin is not None:
        positive = scale * Side(query, normalize).dot(Side(keys, normalize), rows=labels)
        row_lse, _ = similarity_logsumexp(query, keys, scale, normalize=normalize,
                                          row_threshold=positive.detach() + margin,
                                          positives=labels, backend=backend)
        return reduce_losses(row_lse - positive, reduction)
    if name == "naive":
        s = similarity_matrix(query, keys, scale, normalize)
        return F.cross_entropy(s, labels, label_smoothing=label_smoothing, reduction=reduction)

    row_lse, _ = lse(query, keys, scale, normalize, name)
    q, k = Side(query, normalize), Side(keys, normalize)
    positive = scale * q.dot(k, rows=labels)  # S[i, labels[i]]
    row_mean = scale * q.dot_vector(k.total()) / m if label_smoothing else None
    return reduce_losses(cross_entropy_from_lse(row_lse, positive, label_smoothing, row_mean), reduction)


def _grouped_info_nce(query, keys, labels, scale, normalize, label_smoothing, ids, group_mode,
                      margin, name, backend):
    q, k = Side(query, normalize), Side(keys, normalize)
    positive = scale * q.dot(k, rows=labels)  # S[i, labels[i]]
    if group_mode == "positives":
        row_lse, _ = lse(query, keys, scale, normalize, name)
    else:
        threshold = None if margin is None else positive.detach() + margin
        row_lse, _ = similarity_logsumexp(query, keys, scale, normalize=normalize,
                                          row_groups=ids[labels], col_groups=ids,
                                          row_threshold=threshold, positives=labels,
                                          backend=backend)
    groups = Groups(ids, positive.dtype)
    target, smooth = grouped_targets(q, k, groups, groups.index[labels], positive, scale,
                                     group_mode, label_smoothing, keys.shape[0])
    return cross_entropy_from_lse(row_lse, target, label_smoothing, smooth)
