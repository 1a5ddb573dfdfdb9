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

Numerics
--------
The O(N*D) terms are computed in fp32 (fp64 for fp64 inputs) from the raw
features and the (N,) inverse norms, never from normalized N x D copies, so
for fp32 inputs autograd saves nothing of size N x D beyond the inputs. The
loss is fp32 whatever the input dtype; gradients come back in the input dtype.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkernels import _checks, backends
from mmkernels.ops import _common
from mmkernels.ops.logsumexp import lse, similarity_logsumexp, similarity_matrix


class _Side:
    """One side's features as the O(N*D) terms use them: the raw rows in the
    compute dtype (no copy for fp32) and, when normalizing, their inverse
    norms (differentiable), so that Xh = r * x is never formed."""

    def __init__(self, x: Tensor, normalize: bool):
        self.x = x.to(_checks.compute_dtype(x.dtype))
        self.r = _common.inv_norms(x) if normalize else None

    def dot(self, other: "_Side", rows: Tensor | None = None) -> Tensor:
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


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


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


@_checks.outside_autocast
def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale=1.0, *,
                     normalize: bool = False, label_smoothing: float = 0.0,
                     reduction: str = "mean", false_negative_margin=None,
                     backend: str = "auto") -> Tensor:
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
        backend: "auto" or a backend name (see :mod:`mmkernels.backends`).

    Returns:
        fp32 loss (fp64 for fp64 inputs); gradients in the input dtype.
    """
    _checks.check_pair("image_features", image_features, "text_features", text_features,
                       same_rows=True)
    name = backends.select_backend(backend, image_features.device)
    scale = _check_common(logit_scale, label_smoothing, reduction, image_features)
    margin = check_margin(false_negative_margin, label_smoothing)
    if margin is not None:
        positive = scale * _Side(image_features, normalize).dot(_Side(text_features, normalize))
        threshold = positive.detach() + margin
        row_lse, col_lse = similarity_logsumexp(image_features, text_features, scale,
                                                normalize=normalize, row_threshold=threshold,
                                                col_threshold=threshold, backend=backend)
        return _reduce(pair_losses(image_features, text_features, row_lse, col_lse, scale,
                                   normalize, 0.0, n=row_lse.shape[0]), reduction)
    if name == "naive":
        return _naive_contrastive(image_features, text_features, scale, normalize,
                                  label_smoothing, reduction)

    row_lse, col_lse = lse(image_features, text_features, scale, normalize, name)
    return _reduce(pair_losses(image_features, text_features, row_lse, col_lse, scale, normalize,
                               label_smoothing, n=row_lse.shape[0]), reduction)


def pair_losses(image_features, text_features, row_lse, col_lse, scale, normalize,
                label_smoothing, *, n: int, batch_sum=lambda v: v) -> Tensor:
    """The (N,) per-pair losses ``(l_i2t[i] + l_t2i[i]) / 2`` from the pairs' row and
    column logsumexps and the O(N*D) terms. ``n``: the rows of the whole batch;
    ``batch_sum``: a (D,) sum over these rows -> the sum over the whole batch (the
    identity on one process, a sum over ranks in mmkernels.distributed)."""
    img, txt = _Side(image_features, normalize), _Side(text_features, normalize)
    positive = scale * img.dot(txt)  # S[i, i]
    if label_smoothing:
        row_mean = scale * img.dot_vector(batch_sum(txt.total())) / n  # mean_j S[i, j]
        col_mean = scale * txt.dot_vector(batch_sum(img.total())) / n  # mean_i S[i, j]
        kept = 1.0 - label_smoothing
        image_to_text = row_lse - kept * positive - label_smoothing * row_mean
        text_to_image = col_lse - kept * positive - label_smoothing * col_mean
    else:
        image_to_text = row_lse - positive
        text_to_image = col_lse - positive
    return (image_to_text + text_to_image) / 2


def _naive_contrastive(a, b, scale, normalize, label_smoothing, reduction):
    """open_clip's algorithm: materialize S, cross-entropy both ways."""
    s = similarity_matrix(a, b, scale, normalize)
    labels = torch.arange(s.shape[0], device=s.device)
    per_pair = (F.cross_entropy(s, labels, label_smoothing=label_smoothing, reduction="none")
                + F.cross_entropy(s.T, labels, label_smoothing=label_smoothing, reduction="none")) / 2
    return _reduce(per_pair, reduction)


@_checks.outside_autocast
def info_nce(query: Tensor, keys: Tensor, labels: Tensor | None = None, logit_scale=1.0, *,
             normalize: bool = False, label_smoothing: float = 0.0, reduction: str = "mean",
             false_negative_margin=None, backend: str = "auto") -> Tensor:
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
    if margin is not None:
        positive = scale * _Side(query, normalize).dot(_Side(keys, normalize), rows=labels)
        row_lse, _ = similarity_logsumexp(query, keys, scale, normalize=normalize,
                                          row_threshold=positive.detach() + margin,
                                          positives=labels, backend=backend)
        return _reduce(row_lse - positive, reduction)
    if name == "naive":
        s = similarity_matrix(query, keys, scale, normalize)
        return F.cross_entropy(s, labels, label_smoothing=label_smoothing, reduction=reduction)

    row_lse, _ = lse(query, keys, scale, normalize, name)
    q, k = _Side(query, normalize), _Side(keys, normalize)
    positive = scale * q.dot(k, rows=labels)  # S[i, labels[i]]
    if not label_smoothing:
        return _reduce(row_lse - positive, reduction)
    row_mean = scale * q.dot_vector(k.total()) / m
    per_row = row_lse - (1.0 - label_smoothing) * positive - label_smoothing * row_mean
    return _reduce(per_row, reduction)
