"""contrastive_loss / info_nce with groups (multi-positive, or duplicates excluded) and the
debiased contrastive loss (Chuang et al. 2020): against fp64 references written from the
definitions in docs/api.md on the materialized matrices, on every backend under test."""

import math

import pytest
import torch

import mmkernels
import reference
from compare_to_reference import compare
from tolerances import assert_matches, fp32_logit_rtol

NEG_INF = float("-inf")
SIZES = [1, 2, 3, 4, 1, 4, 2]  # group sizes 1..4, N = 17: straddles the 8 x 16 test tiles


# --- the references, from the definitions ---------------------------------------------

def grouped_rows(s, labels, key_groups, mode, eps=0.0, margin=None):
    """Per-row cross-entropies of the logits s (N, M), row i's positive key labels[i]:
    "positives": the target is uniform on the keys of labels[i]'s group; "exclude": the
    group's other keys leave row i's softmax (and, with a margin, the keys above the
    positive's logit + margin). Smoothing puts eps uniformly on the keys left."""
    n, m = s.shape
    is_pos = torch.zeros(n, m, dtype=torch.bool)
    is_pos[torch.arange(n), labels] = True
    same = key_groups.unsqueeze(0) == key_groups[labels].unsqueeze(1)
    if mode == "positives":
        kept = torch.ones(n, m, dtype=torch.bool)
        on_positives = same.double() / same.sum(1, keepdim=True)
    else:
        kept = ~same | is_pos
        if margin is not None:
            pos_logit = s.detach().gather(1, labels.unsqueeze(1))
            kept &= (s.detach() <= pos_logit + margin) | is_pos
        on_positives = is_pos.double()
    target = ((1 - eps) * on_positives + eps * kept.double() / kept.sum(1, keepdim=True)).to(s.dtype)
    log_p = torch.log_softmax(s.masked_fill(~kept, NEG_INF), 1).masked_fill(~kept, 0.0)
    return -(target * log_p).sum(1)


def grouped_contrastive(a, b, s, groups, mode, normalize=False, eps=0.0, margin=None):
    """(N,) per-pair losses: both directions, pair i's positive its own partner."""
    logits = reference.logits(a, b, s, normalize)
    labels = torch.arange(a.shape[0])
    return (grouped_rows(logits, labels, groups, mode, eps, margin)
            + grouped_rows(logits.T, labels, groups, mode, eps, margin)) / 2


def debiased_rows(s, tau_plus, floor):
    """log(pos + Ng) - log(pos) per row of the square logits s, with
    Ng = max((neg - tau+ M pos) / (1 - tau+), M exp(floor)), M = N - 1; every exp
    shifted by the row's max, which cancels."""
    n = s.shape[0]
    m = n - 1
    shift = s.detach().amax(1, keepdim=True)
    e = torch.exp(s - shift)
    pos = e.diagonal()
    neg = e.masked_fill(torch.eye(n, dtype=torch.bool), 0.0).sum(1)
    estimate = (neg - tau_plus * m * pos) / (1 - tau_plus)
    ng = torch.maximum(estimate, m * torch.exp(floor - shift.squeeze(1)))
    return torch.log(pos + ng) - (s.diagonal() - shift.squeeze(1))  # log pos, even where it underflows


def logit_floors(a, b, s, normalize):
    """The documented lower bounds of each row's and each column's logits."""
    bound = torch.as_tensor(s, dtype=a.dtype).abs()
    if normalize:
        ones = torch.ones(a.shape[0], dtype=a.dtype)
        return -bound * ones, -bound * ones
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    return -bound * norm_a * norm_b.max(), -bound * norm_b * norm_a.max()


def debiased_contrastive(a, b, s, tau_plus, normalize=False):
    logits = reference.logits(a, b, s, normalize)
    row_floor, col_floor = logit_floors(a, b, s, normalize)
    return (debiased_rows(logits, tau_plus, row_floor)
            + debiased_rows(logits.T, tau_plus, col_floor)) / 2


# --- inputs ------------------------------------------------------------------------

def group_ids(sizes):
    """Ids of groups of these sizes, in shuffled positions, with arbitrary (also
    negative, non-consecutive) values."""
    values = torch.randperm(len(sizes)) * 13 - 20
    ids = torch.repeat_interleave(values, torch.tensor(sizes))
    return ids[torch.randperm(ids.shape[0])]


def grouped_features(ids, d, spread=0.5):
    """Pairs whose members of one group lie near a common centre (duplicates)."""
    _, index = torch.unique(ids, return_inverse=True)
    centres_a, centres_b = torch.randn(int(index.max()) + 1, d), torch.randn(int(index.max()) + 1, d)
    a = centres_a[index] + spread * torch.randn(ids.shape[0], d)
    b = centres_a[index] + 0.3 * centres_b[index] + spread * torch.randn(ids.shape[0], d)
    return a, b


def _unclustered(n, d):
    """Random pairs, for bf16: with a dominant positive (clustered pairs at scale 100)
    a feature gradient is the difference of two large terms (the primitive's and the
    positive logit's) that come back rounded to bf16 separately: the plain loss has
    that error too (see the report of this branch), so the bf16 bar is checked on
    pairs where no term dominates, as in tests/test_contrastive.py."""
    return torch.randn(n, d), torch.randn(n, d)


def _clip(backend, **kw):
    return lambda a, b, s: mmkernels.contrastive_loss(a, b, s, backend=backend, reduction="none",
                                                      **kw)


# --- groups: contrastive_loss ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["positives", "exclude"])
@pytest.mark.parametrize("normalize", [False, True])
def test_groups(backend, small_tiles, mode, normalize):
    ids = group_ids(SIZES)
    a, b = grouped_features(ids, 12)
    compare(_clip(backend, normalize=normalize, groups=ids, group_mode=mode),
            lambda a, b, s: grouped_contrastive(a, b, s, ids, mode, normalize),
            [a, b], torch.float32, scale=torch.tensor(20.0 if normalize else 2.0),
            what=f"{backend} groups {mode}")


def test_groups_change_the_loss(backend):
    """The two modes differ from each other and from the plain loss on duplicated pairs."""
    ids = group_ids(SIZES)
    a, b = grouped_features(ids, 12)
    kw = dict(normalize=True, backend=backend)
    plain = mmkernels.contrastive_loss(a, b, 10.0, **kw)
    positives = mmkernels.contrastive_loss(a, b, 10.0, groups=ids, **kw)
    exclude = mmkernels.contrastive_loss(a, b, 10.0, groups=ids, group_mode="exclude", **kw)
    assert exclude < plain  # the duplicates' mass left the denominators
    assert abs(positives - plain) > 1e-3 and abs(positives - exclude) > 1e-3


@pytest.mark.parametrize("mode", ["positives", "exclude"])
@pytest.mark.parametrize("n", [1, 9, 17])
def test_singleton_groups_are_the_plain_loss(backend, small_tiles, mode, n):
    a, b = torch.randn(n, 7), torch.randn(n, 7)
    ids = torch.randperm(n) * 3 - 5
    compare(_clip(backend, normalize=True, groups=ids, group_mode=mode),
            lambda a, b, s: reference.contrastive(a, b, s, normalize=True, reduction="none"),
            [a, b], torch.float32, scale=torch.tensor(20.0), what=f"{backend} singletons {mode}")
    got = mmkernels.contrastive_loss(a, b, 20.0, normalize=True, groups=ids, group_mode=mode,
                                     backend=backend)
    plain = mmkernels.contrastive_loss(a, b, 20.0, normalize=True, backend=backend)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)  # logits of 20: fp32 ulps


def test_one_group(backend):
    """Every pair in one group: "exclude" leaves each row its positive alone (loss 0);
    "positives" is lse - mean of the row."""
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    ids = torch.zeros(5, dtype=torch.int64)
    exclude = mmkernels.contrastive_loss(a, b, 3.0, groups=ids, group_mode="exclude",
                                         reduction="none", backend=backend)
    torch.testing.assert_close(exclude, torch.zeros(5), atol=1e-5, rtol=0)
    positives = mmkernels.contrastive_loss(a, b, 3.0, groups=ids, reduction="none",
                                           backend=backend)
    s = 3.0 * a.double() @ b.double().T
    want = ((torch.logsumexp(s, 1) - s.mean(1)) + (torch.logsumexp(s, 0) - s.mean(0))) / 2
    torch.testing.assert_close(positives.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["positives", "exclude"])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_groups_label_smoothing(backend, small_tiles, mode, eps):
    ids = group_ids(SIZES)
    a, b = grouped_features(ids, 9)
    compare(_clip(backend, normalize=True, groups=ids, group_mode=mode, label_smoothing=eps),
            lambda a, b, s: grouped_contrastive(a, b, s, ids, mode, True, eps),
            [a, b], torch.float32, scale=torch.tensor(20.0), what=f"{backend} {mode} ls={eps}")


@pytest.mark.parametrize("margin", [0.0, 1.5])
def test_groups_exclude_with_margin(backend, small_tiles, margin):
    ids = group_ids(SIZES)
    a, b = grouped_features(ids, 9, spread=0.3)
    a[3] = b[11] + 0.05 * torch.randn(9)  # a false negative outside any group
    compare(_clip(backend, normalize=True, groups=ids, group_mode="exclude",
                  false_negative_margin=margin),
            lambda a, b, s: grouped_contrastive(a, b, s, ids, "exclude", True, margin=margin),
            [a, b], torch.float32, scale=torch.tensor(20.0), what=f"{backend} margin {margin}")


@pytest.mark.parametrize("mode", ["positives", "exclude"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_groups_dtypes_and_scales(backend, small_tiles, mode, dtype, scale):
    ids = group_ids(SIZES)
    a, b = grouped_features(ids, 16) if dtype == torch.float64 else _unclustered(17, 16)
    compare(_clip(backend, normalize=True, groups=ids, group_mode=mode),
            lambda a, b, s: grouped_contrastive(a, b, s, ids, mode, True),
            [a, b], dtype, scale=torch.tensor(scale), what=f"{backend} {mode} {dtype} {scale}")


@pytest.mark.parametrize("mode", ["positives", "exclude"])
def test_groups_fp32_scale_100_unnormalized(backend, small_tiles, mode):
    ids = group_ids(SIZES)
    a, b = grouped_features(ids, 16)
    largest = (100 * a @ b.T).abs().max().item()
    compare(_clip(backend, groups=ids, group_mode=mode),
            lambda a, b, s: grouped_contrastive(a, b, s, ids, mode),
            [a, b], torch.float32, scale=torch.tensor(100.0), what=f"{backend} {mode} scale 100",
            rtol=fp32_logit_rtol(largest))


@pytest.mark.parametrize("mode", ["positives", "exclude"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_groups_gradcheck(backend, small_tiles, mode, eps):
    ids = group_ids([1, 2, 3, 4])
    for normalize in (False, True):
        a, b = (x.double().requires_grad_() for x in grouped_features(ids, 5))
        scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, b, s: mmkernels.contrastive_loss(
                a, b, s, normalize=normalize, groups=ids, group_mode=mode, label_smoothing=eps,
                reduction="none", backend=backend), (a, b, scale))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_groups_reductions(backend, small_tiles, reduction):
    ids = group_ids(SIZES)
    a, b = grouped_features(ids, 8)
    per_pair = grouped_contrastive(a.double(), b.double(), 5.0, ids, "positives", True)
    got = mmkernels.contrastive_loss(a, b, 5.0, normalize=True, groups=ids,
                                     reduction=reduction, backend=backend)
    assert_matches(got, getattr(per_pair, reduction)(), torch.float32, reduction)


# --- groups: info_nce -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["positives", "exclude"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_info_nce_groups(backend, small_tiles, mode, eps):
    """Rectangular (11 queries, 23 keys), labels in any order (some keys the positive of
    two queries, some of none), keys in groups of sizes 1..4."""
    key_ids = group_ids([1, 2, 3, 4, 1, 4, 2, 3, 3])
    q, keys = torch.randn(11, 6), torch.randn(23, 6)
    labels = torch.randint(0, 23, (11,))
    keys[labels[0]] = q[0] + 0.1 * torch.randn(6)
    compare(lambda q, k, s: mmkernels.info_nce(q, k, labels, s, normalize=True, groups=key_ids,
                                               group_mode=mode, label_smoothing=eps,
                                               reduction="none", backend=backend),
            lambda q, k, s: grouped_rows(reference.logits(q, k, s, True), labels, key_ids,
                                         mode, eps),
            [q, keys], torch.float32, scale=torch.tensor(20.0), what=f"{backend} info_nce {mode}")


@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_info_nce_groups_exclude_margin(backend, small_tiles, margin):
    key_ids = group_ids([1, 2, 3, 4, 1, 4, 2, 3, 3])
    q, keys = torch.randn(11, 6), torch.randn(23, 6)
    labels = torch.randperm(23)[:11]
    keys[labels[4]] = q[2] + 0.05 * torch.randn(6)  # a false negative of query 2
    compare(lambda q, k, s: mmkernels.info_nce(q, k, labels, s, normalize=True, groups=key_ids,
                                               group_mode="exclude",
                                               false_negative_margin=margin,
                                               reduction="none", backend=backend),
            lambda q, k, s: grouped_rows(reference.logits(q, k, s, True), labels, key_ids,
                                         "exclude", margin=margin),
            [q, keys], torch.float32, scale=torch.tensor(20.0),
            what=f"{backend} info_nce margin {margin}")


@pytest.mark.parametrize("mode", ["positives", "exclude"])
def test_info_nce_groups_match_contrastive(backend, mode):
    """Square, default labels: the row direction of contrastive_loss's groups."""
    ids = group_ids(SIZES)
    a, b = grouped_features(ids, 8)
    got = mmkernels.info_nce(a, b, None, 4.0, groups=ids, group_mode=mode, reduction="none",
                             backend=backend)
    want = grouped_rows(reference.logits(a.double(), b.double(), 4.0, False),
                        torch.arange(17), ids, mode)
    assert_matches(got, want, torch.float32, f"{backend} info_nce square {mode}")


def test_info_nce_groups_gradcheck(backend, small_tiles):
    key_ids = group_ids([1, 3, 2, 4])
    q = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 9, 5, 1])
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    for mode in ("positives", "exclude"):
        assert torch.autograd.gradcheck(lambda q, k, s: mmkernels.info_nce(
            q, k, labels, s, normalize=True, groups=key_ids, group_mode=mode,
            label_smoothing=0.1, reduction="none", backend=backend), (q, keys, scale))


# --- debiased contrastive loss ----------------------------------------------------------

def _debias(backend, tau_plus, **kw):
    return _clip(backend, debias_tau_plus=tau_plus, **kw)


def _aligned_pairs(n, d, aligned):
    """Random pairs, the first ``aligned`` of them near-identical (an easy positive, whose
    estimate of the negatives goes below the clamp for a large tau+)."""
    a, b = torch.randn(n, d), torch.randn(n, d)
    b[:aligned] = a[:aligned] + 0.05 * torch.randn(aligned, d)
    return a, b


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("n", [2, 9, 17])
def test_debias_tau_zero_is_the_plain_loss(backend, small_tiles, normalize, n):
    """tau+ = 0: log(pos + neg) - S[i, i], the plain loss (the positive stays in its
    denominator; the diagonal is excluded only to get neg), not neg's lse - S[i, i]."""
    a, b = torch.randn(n, 6), torch.randn(n, 6)
    compare(_debias(backend, 0.0, normalize=normalize),
            lambda a, b, s: reference.contrastive(a, b, s, normalize=normalize, reduction="none"),
            [a, b], torch.float32, scale=torch.tensor(20.0), what=f"{backend} tau 0")
    got = mmkernels.contrastive_loss(a, b, 20.0, normalize=normalize, debias_tau_plus=0.0,
                                     backend=backend)
    torch.testing.assert_close(got, mmkernels.contrastive_loss(a, b, 20.0, normalize=normalize,
                                                               backend=backend),
                               rtol=1e-5, atol=1e-6)
    neg_row, neg_col = mmkernels.similarity_logsumexp(
        a, b, 20.0, normalize=normalize, exclude_diagonal=True,
        positives=torch.full((n,), -1), backend=backend)
    positive = torch.diagonal(reference.logits(a, b, 20.0, normalize))
    decoupled = ((neg_row - positive) + (neg_col - positive)).mean() / 2
    assert got > decoupled + 1e-4


@pytest.mark.parametrize("tau_plus", [0.1, 0.5])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_debias(backend, small_tiles, tau_plus, normalize, scale):
    a, b = _aligned_pairs(17, 16, 6)
    if not normalize:
        a, b = a * 0.4, b * 0.4
    largest = (scale * reference.logits(a, b, 1.0, normalize)).abs().max().item()
    compare(_debias(backend, tau_plus, normalize=normalize),
            lambda a, b, s: debiased_contrastive(a, b, s, tau_plus, normalize),
            [a, b], torch.float32, scale=torch.tensor(scale),
            what=f"{backend} tau {tau_plus} scale {scale}", rtol=fp32_logit_rtol(largest))


@pytest.mark.parametrize("normalize", [False, True])
def test_debias_clamp_binds(backend, small_tiles, normalize):
    """tau+ = 0.5: the easy pairs' estimate of the negatives is below the clamp, the
    others' is not, so both branches (and the floor's gradient) are exercised."""
    a, b = _aligned_pairs(17, 16, 6)
    s = reference.logits(a.double(), b.double(), 10.0, normalize)
    row_floor, _ = logit_floors(a.double(), b.double(), 10.0, normalize)
    m = 16
    neg = torch.logsumexp(s.masked_fill(torch.eye(17, dtype=torch.bool), NEG_INF), 1)
    estimate = (neg.exp() - 0.5 * m * s.diagonal().exp()) / (1 - 0.5)
    estimate_positive = estimate > m * torch.exp(row_floor)
    assert 0 < int(estimate_positive.sum()) < 17
    compare(_debias(backend, 0.5, normalize=normalize),
            lambda a, b, s: debiased_contrastive(a, b, s, 0.5, normalize),
            [a, b], torch.float32, scale=torch.tensor(10.0), what=f"{backend} clamp")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_debias_dtypes(backend, small_tiles, dtype, scale):
    a, b = _aligned_pairs(13, 16, 4) if dtype == torch.float64 else _unclustered(13, 16)
    compare(_debias(backend, 0.1, normalize=True),
            lambda a, b, s: debiased_contrastive(a, b, s, 0.1, True),
            [a, b], dtype, scale=torch.tensor(scale), what=f"{backend} debias {dtype}")


@pytest.mark.parametrize("tau_plus", [0.1, 0.5])
def test_debias_gradcheck(backend, small_tiles, tau_plus):
    for normalize in (False, True):
        a, b = (x.double().requires_grad_() for x in _aligned_pairs(7, 5, 3))
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b, s: mmkernels.contrastive_loss(
            a, b, s, normalize=normalize, debias_tau_plus=tau_plus, reduction="none",
            backend=backend), (a, b, scale))


def test_debias_large_scale_stays_finite(backend):
    """Logits in the thousands: every step in log space, no overflow."""
    a, b = _aligned_pairs(9, 16, 3)
    a, b = a * 3, b * 3
    largest = (100 * a @ b.T).abs().max().item()
    assert largest > 5000
    loss = mmkernels.contrastive_loss(a.requires_grad_(), b, 100.0, debias_tau_plus=0.3,
                                      backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    want = debiased_contrastive(a.detach().double(), b.double(), 100.0, 0.3).mean()
    assert math.isclose(loss.item(), want.item(), rel_tol=fp32_logit_rtol(largest), abs_tol=1e-3)


# --- errors ---------------------------------------------------------------------------

def test_errors():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    f = mmkernels.contrastive_loss
    ids = torch.tensor([0, 0, 1, 2])
    with pytest.raises(TypeError, match="groups"):
        f(a, b, groups=[0, 0, 1, 2])
    with pytest.raises(TypeError, match="groups"):
        f(a, b, groups=ids.int())
    with pytest.raises(ValueError, match="groups"):
        f(a, b, groups=ids[:3])
    with pytest.raises(ValueError, match="group_mode"):
        f(a, b, groups=ids, group_mode="drop")
    with pytest.raises(ValueError, match="group_mode"):
        f(a, b, group_mode=None)
    with pytest.raises(ValueError, match="false_negative_margin.*group_mode"):
        f(a, b, groups=ids, false_negative_margin=0.1)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="debias_tau_plus"):
            f(a, b, debias_tau_plus=bad)
    for bad in ("0.1", True, torch.tensor(0.1)):
        with pytest.raises(TypeError, match="debias_tau_plus"):
            f(a, b, debias_tau_plus=bad)
    with pytest.raises(ValueError, match="debias_tau_plus.*N >= 2"):
        f(a[:1], b[:1], debias_tau_plus=0.1)
    with pytest.raises(ValueError, match="debias_tau_plus.*label_smoothing"):
        f(a, b, debias_tau_plus=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="debias_tau_plus.*false_negative_margin"):
        f(a, b, debias_tau_plus=0.1, false_negative_margin=0.5)
    with pytest.raises(ValueError, match="debias_tau_plus.*groups"):
        f(a, b, debias_tau_plus=0.1, groups=ids)
    q, keys = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"groups: expected shape \(6,\), one group per key"):
        mmkernels.info_nce(q, keys, groups=ids)
    with pytest.raises(ValueError, match="false_negative_margin"):
        mmkernels.info_nce(q, keys, groups=torch.arange(6), false_negative_margin=0.0)
    with pytest.raises(ValueError, match="group_mode"):
        mmkernels.info_nce(q, keys, groups=torch.arange(6), group_mode="positive")
