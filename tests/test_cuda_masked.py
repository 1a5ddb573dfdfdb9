"""The masked primitive's CUDA kernels (backend="cuda" on CUDA tensors) against
the torch backend on the same tensors: every rule alone and together, the
dtypes, rows and columns with every entry excluded, a threshold at an exact
tie, and a frozen side's gradients and products. Skipped without a GPU or
without the extension's CUDA kernels; on CPU the same kernels run in the
emulation lane (tests/test_cuda_emulated.py)."""

import pytest
import torch

import mmkernels
from mmkernels import _extension

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not _extension.cuda_built(), reason="built without the CUDA kernels")]

NEG_INF = float("-inf")
# dtype -> (rtol, atol relative to the largest value) of cuda against torch; fp16/bf16
# inputs: both accumulate in fp32, but the CUDA backward's P is bf16 for bf16 inputs.
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 5e-6),
             torch.float16: (2e-3, 1e-3), torch.bfloat16: (3e-2, 2e-2)}


@pytest.fixture
def cuda_bands():
    """Bands of 64 rows, so that the shapes below span several; restored after."""
    previous = _extension._C.set_cuda_band_rows(64)
    yield
    _extension._C.set_cuda_band_rows(previous)


def features(n, m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).cuda(), torch.randn(m, d, generator=g).cuda()


def between_logits(s):
    """Per row of ``s``, a threshold in the widest gap between two of its middle
    logits: far from every logit, so that both backends' roundings decide alike."""
    ordered = s.sort(dim=1).values
    k = s.shape[1]
    if k == 1:
        return ordered[:, 0] + 1.0
    lo, hi = k // 4, max(k // 4 + 1, 3 * k // 4)
    at = (ordered[:, lo + 1:hi + 1] - ordered[:, lo:hi]).argmax(dim=1, keepdim=True) + lo
    return ((ordered.gather(1, at) + ordered.gather(1, at + 1)) / 2).squeeze(1)


def rule_sets(a, b, scale):
    n, m = a.shape[0], b.shape[0]
    s = scale * torch.nn.functional.normalize(a.double(), dim=1) @ torch.nn.functional.normalize(
        b.double(), dim=1).T
    row_t, col_t = between_logits(s).float(), between_logits(s.T).float()
    groups = torch.arange(n, device="cuda") % 3, torch.arange(m, device="cuda") % 3
    positives = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(1)).cuda()
    positives[::5] = -1
    return {
        "diagonal": dict(exclude_diagonal=True, positives=torch.full((n,), -1, device="cuda")),
        "groups": dict(row_groups=groups[0], col_groups=groups[1]),
        "row_threshold": dict(row_threshold=row_t),
        "col_threshold": dict(col_threshold=col_t),
        "all": dict(exclude_diagonal=True, positives=positives, row_groups=groups[0],
                    col_groups=groups[1], row_threshold=row_t, col_threshold=col_t),
    }


def run(backend, a, b, scale, weights, wanted="abs", normalize=True, **rules):
    """(row_lse, col_lse) and the gradients of the leaves in ``wanted`` (a, b, s)
    through a weighting of both statistics, -inf entries left out."""
    a = a.detach().clone().requires_grad_("a" in wanted)
    b = b.detach().clone().requires_grad_("b" in wanted)
    scale = scale.detach().clone().requires_grad_("s" in wanted)
    row, col = mmkernels.similarity_logsumexp(a, b, scale, normalize=normalize, backend=backend, **rules)
    total = sum((w * t.double()).masked_fill(torch.isinf(t), 0.0).sum()
                for w, t in zip(weights, (row, col)))
    leaves = [x for x, name in ((a, "a"), (b, "b"), (scale, "s")) if name in wanted]
    total = total + 0.0 * sum(x.sum() for x in leaves)  # a graph even when all is excluded
    return (row.detach(), col.detach()), torch.autograd.grad(total, leaves)


def assert_close(got, want, dtype, what):
    rtol, atol = TOLERANCE[dtype]
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: -inf entries differ"
    finite = ~torch.isinf(want)
    if finite.any():
        got, want = got[finite].double(), want[finite].double()
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(want.abs().max().item(), 1.0),
                                   msg=what)


def compare(a, b, scale, dtype=torch.float32, normalize=True, **rules):
    a, b = a.to(dtype), b.to(dtype)
    scale = torch.tensor(scale, device="cuda")
    weights = [torch.randn(a.shape[0], device="cuda", dtype=torch.float64),
               torch.randn(b.shape[0], device="cuda", dtype=torch.float64)]
    got_values, got_grads = run("cuda", a, b, scale, weights, normalize=normalize, **rules)
    want_values, want_grads = run("torch", a, b, scale, weights, normalize=normalize, **rules)
    for what, got, want in zip(("row_lse", "col_lse"), got_values, want_values):
        assert_close(got, want, dtype, what)
    for what, got, want in zip(("grad a", "grad b", "grad scale"), got_grads, want_grads):
        assert torch.isfinite(got).all(), f"{what}: not finite"
        assert_close(got, want, dtype, what)


@pytest.mark.parametrize("rule", ["diagonal", "groups", "row_threshold", "col_threshold", "all"])
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (63, 65, 17), (130, 70, 40)])
def test_each_rule_and_all_together(cuda_bands, rule, n, m, d):
    a, b = features(n, m, d)
    compare(a, b, 4.0, **rule_sets(a, b, 4.0)[rule])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(cuda_bands, dtype):
    a, b = features(150, 97, 40, seed=2)
    compare(a, b, 1 / 0.07, dtype, **rule_sets(a.to(dtype), b.to(dtype), 1 / 0.07)["all"])


def test_rows_and_columns_with_every_entry_excluded(cuda_bands):
    n = 70
    a, b = features(n, n, 5, seed=4)
    groups = torch.zeros(n, dtype=torch.int64, device="cuda")  # one group: all but the positive leave
    positives = torch.arange(n, device="cuda")
    positives[:5] = -1
    row, col = mmkernels.similarity_logsumexp(a, b, 3.0, row_groups=groups, col_groups=groups,
                                              positives=positives, backend="cuda")
    assert (row[:5] == NEG_INF).all() and (col[:5] == NEG_INF).all()
    assert torch.isfinite(row[5:]).all() and torch.isfinite(col[5:]).all()
    compare(a, b, 3.0, row_groups=groups, col_groups=groups, positives=positives)


def test_a_logit_at_its_threshold_stays(cuda_bands):
    """Integer features: every logit exact, so a threshold equal to a logit is a true
    tie; the forward and the backward must both keep it (the gradients show a
    backward that decided otherwise)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-3, 4, (70, 6), generator=g).float().cuda()
    b = torch.randint(-3, 4, (75, 6), generator=g).float().cuda()
    s = a @ b.T
    row_t = s[torch.arange(70), torch.arange(70)] + 1.0  # positive + margin: an exact logit often
    col_t = s[0].clone()  # column j's threshold: its own logit in row 0
    assert (s == row_t.unsqueeze(1)).any(), "the construction must produce ties"
    compare(a, b, 1.0, normalize=False, row_threshold=row_t, col_threshold=col_t)


@pytest.mark.parametrize("trainable", ["a", "b", "s", "as", "bs", "abs"])
def test_frozen_side_gradients_equal_the_full_backward(cuda_bands, trainable):
    a, b = features(130, 70, 12, seed=11)
    rules = rule_sets(a, b, 4.0)["all"]
    scale = torch.tensor(4.0, device="cuda")
    weights = [torch.rand(130, device="cuda", dtype=torch.float64),
               torch.rand(70, device="cuda", dtype=torch.float64)]
    _, full = run("cuda", a, b, scale, weights, "abs", **rules)
    full = dict(zip("abs", full))
    before = _extension._C.products_computed()
    _, frozen = run("cuda", a, b, scale, weights, trainable, **rules)
    after = _extension._C.products_computed()
    for name, grad in zip([x for x in "abs" if x in trainable], frozen):
        torch.testing.assert_close(grad, full[name], rtol=1e-6, atol=1e-7, msg=name)
    # 3 products instead of 4 unless both sides train; the scale takes either.
    want = (1, int("a" in trainable or trainable == "s"), int("b" in trainable))
    assert tuple(x - y for x, y in zip(after, before)) == want
