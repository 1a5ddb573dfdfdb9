"""similarity_logsumexp with exclusions (diagonal, groups, thresholds, positives)
against an fp64 reference written from the rules, on every backend that has
masked kernels; the others must refuse with a clear error."""

import pytest
import torch

import mmkernels
from conftest import backends_under_test
from mmkernels import _extension
from mmkernels.ops import masked_logsumexp
from tolerances import assert_matches, fp32_logit_rtol

# The backends under test on CPU tensors (the interpreter lane: triton alone) that have
# masked kernels.
MASKED_BACKENDS = [name for name in backends_under_test() if name in masked_logsumexp.KERNELS]
NEG_INF = float("-inf")


# --- the reference: the rules, entry by entry, in fp64 -------------------------

def reference(a, b, scale, *, normalize=False, exclude_diagonal=False, row_groups=None,
              col_groups=None, row_threshold=None, col_threshold=None, positives=None):
    """(row_lse, col_lse) in fp64 from an explicit keep-list per entry,
    differentiable w.r.t. a, b and scale (excluded entries take no part)."""
    a64, b64 = a.double(), b.double()
    if normalize:
        a64 = a64 / a64.norm(dim=1, keepdim=True)
        b64 = b64 / b64.norm(dim=1, keepdim=True)
    s = scale.double() * a64 @ b64.T
    n, m = s.shape
    pos = list(range(n)) if positives is None else positives.tolist()
    keep_row = torch.ones(n, m, dtype=torch.bool)
    keep_col = torch.ones(n, m, dtype=torch.bool)
    for i in range(n):
        for j in range(m):
            if j == pos[i]:
                continue
            common = ((exclude_diagonal and i == j)
                      or (row_groups is not None and row_groups[i] == col_groups[j]))
            value = s[i, j].item()
            if common or (row_threshold is not None and value > row_threshold[i].item()):
                keep_row[i, j] = False
            if common or (col_threshold is not None and value > col_threshold[j].item()):
                keep_col[i, j] = False
    rows = [torch.logsumexp(s[i][keep_row[i]], 0) if keep_row[i].any() else s.new_tensor(NEG_INF)
            for i in range(n)]
    cols = [torch.logsumexp(s[:, j][keep_col[:, j]], 0) if keep_col[:, j].any()
            else s.new_tensor(NEG_INF) for j in range(m)]
    return torch.stack(rows), torch.stack(cols)


def check(backend, a, b, scale, dtype=torch.float32, rtol=None, **rules):
    """Values and the gradients of a, b, scale (through a random weighting of both
    statistics, -inf entries left out) against the reference."""
    a = a.to(dtype).requires_grad_()
    b = b.to(dtype).requires_grad_()
    scale = scale.clone().requires_grad_()
    got = mmkernels.similarity_logsumexp(a, b, scale, backend=backend, **rules)
    ref = reference(a, b, scale, **rules)
    torch.manual_seed(1)
    weights = [torch.randn(t.shape, dtype=torch.float64) for t in ref]
    outputs = {}
    for label, tensors in (("ours", got), ("reference", ref)):
        total = sum((w * t.double()).masked_fill(torch.isinf(r), 0.0).sum()
                    for w, t, r in zip(weights, tensors, ref))
        total = total + 0.0 * (a.sum() + b.sum() + scale)  # a graph even when all is excluded
        outputs[label] = torch.autograd.grad(total, (a, b, scale))
    for what, ours, want in zip(("row_lse", "col_lse"), got, ref):
        assert torch.equal(torch.isinf(ours), torch.isinf(want)), f"{what}: -inf entries differ"
        finite = ~torch.isinf(want)
        if not finite.any():
            continue
        assert_matches(ours[finite], want[finite].detach(), torch.float64 if dtype == torch.float64
                       else torch.float32, f"{backend} {what}", rtol=rtol)
    for what, ours, want in zip(("grad a", "grad b", "grad scale"), outputs["ours"],
                                outputs["reference"]):
        assert torch.isfinite(ours).all(), f"{backend} {what}: not finite"
        assert_matches(ours, want, torch.float64 if dtype == torch.float64 else torch.float32,
                       f"{backend} {what}", rtol=rtol)


def features(n, m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)


def thresholds_between(a, b, scale, quantile):
    """Per-row and per-column thresholds that cut through the logits, each off any
    logit (fp32 and the fp64 reference decide a tie apart: the exact-tie test
    below uses exact logits)."""
    s = scale * torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    return s.quantile(quantile, dim=1) + 1e-3, s.quantile(quantile, dim=0) + 1e-3


def sparse_copies(n, m):
    """Column groups where most columns are their own item and rows 0 and 1 (of
    groups arange(n)) have copies far away (the middle and last columns): a row meets
    its group in one or two column tiles, not in every one."""
    groups = torch.arange(m) + n
    groups[: min(n, m)] = torch.arange(min(n, m))
    if m > 2:
        groups[m - 1] = 0
        groups[m // 2] = min(1, n - 1)
    return groups


def rule_sets(n, m, a, b, scale):
    row_t, col_t = thresholds_between(a, b, scale, 0.6)
    groups_rows = torch.arange(n) % 3
    groups_cols = torch.arange(m) % 3
    no_positive = torch.full((n,), -1)
    return {
        "diagonal": dict(exclude_diagonal=True, positives=no_positive),
        "groups": dict(row_groups=groups_rows, col_groups=groups_cols),
        "sparse_groups": dict(row_groups=torch.arange(n), col_groups=sparse_copies(n, m)),
        "row_threshold": dict(row_threshold=row_t),
        "col_threshold": dict(col_threshold=col_t),
        "all": dict(exclude_diagonal=True, positives=(torch.arange(n) + 1) % m,
                    row_groups=groups_rows, col_groups=groups_cols,
                    row_threshold=row_t, col_threshold=col_t),
    }


# --- every rule alone and combined, tile edges, both statistics ---------------

@pytest.mark.parametrize("backend", MASKED_BACKENDS)
@pytest.mark.parametrize("rule", ["diagonal", "groups", "sparse_groups", "row_threshold", "col_threshold",
                                  "all"])
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (9, 17, 5), (17, 17, 8), (20, 33, 6)])
def test_each_rule_and_all_together(backend, small_tiles, rule, n, m, d):
    a, b = features(n, m, d)
    scale = torch.tensor(4.0)
    rules = rule_sets(n, m, a, b, scale)[rule]
    check(backend, a, b, scale, normalize=True, **rules)


@pytest.mark.skipif(not _extension.cpu_built(), reason="needs the C++ CPU kernels")
@pytest.mark.parametrize("rule", ["groups", "sparse_groups", "all"])
@pytest.mark.parametrize("n,m,d", [(9, 17, 5), (20, 45, 6)])
def test_every_cpu_instruction_set(isa, small_tiles, rule, n, m, d):
    """The C++ tile kernels' SIMD and portable exclusion masks, at vector and tile edges."""
    a, b = features(n, m, d, seed=3)
    scale = torch.tensor(4.0)
    check("cpu", a, b, scale, normalize=True, **rule_sets(n, m, a, b, scale)[rule])
    check_large_scale_unnormalized("cpu")


@pytest.mark.parametrize("backend", MASKED_BACKENDS)
def test_rectangular_with_positives_and_rows_without_one(backend, small_tiles):
    n, m = 10, 27  # InfoNCE with hard negatives: row i's positive somewhere in b
    a, b = features(n, m, 7, seed=3)
    positives = torch.randperm(m)[:n]
    positives[[2, 7]] = -1
    row_t, _ = thresholds_between(a, b, torch.tensor(5.0), 0.5)
    check(backend, a, b, torch.tensor(5.0), normalize=True, positives=positives,
          row_threshold=row_t, row_groups=torch.arange(n) % 4, col_groups=torch.arange(m) % 4)


@pytest.mark.parametrize("backend", MASKED_BACKENDS)
def test_rows_and_columns_with_every_entry_excluded(backend, small_tiles):
    n = 12
    a, b = features(n, n, 5, seed=4)
    groups = torch.zeros(n, dtype=torch.int64)  # one group: all but the positive leave
    positives = torch.arange(n)
    positives[:5] = -1  # these rows keep nothing
    row_lse, col_lse = mmkernels.similarity_logsumexp(
        a, b, 3.0, row_groups=groups, col_groups=groups, positives=positives, backend=backend)
    assert torch.isinf(row_lse[:5]).all() and (row_lse[:5] < 0).all()
    assert torch.isinf(col_lse[:5]).all() and torch.isfinite(col_lse[5:]).all()
    check(backend, a, b, torch.tensor(3.0), row_groups=groups, col_groups=groups,
          positives=positives)


@pytest.mark.parametrize("backend", MASKED_BACKENDS)
def test_a_logit_at_its_threshold_stays(backend, small_tiles):
    """Integer features: every logit exact in fp32, so a threshold equal to a logit is
    a true tie, and the rule (strictly above leaves) is tested exactly."""
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-3, 4, (11, 6), generator=g).float()
    b = torch.randint(-3, 4, (13, 6), generator=g).float()
    s = a @ b.T
    row_t = s[torch.arange(11), torch.arange(11)] + 1.0  # positive + margin: an exact logit often
    ties = (s == row_t.unsqueeze(1)).sum().item()
    assert ties > 0, "the construction must produce ties"
    check(backend, a, b, torch.tensor(1.0), row_threshold=row_t)


@pytest.mark.parametrize("backend", MASKED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(backend, small_tiles, dtype):
    a, b = features(19, 24, 16, seed=6)
    a, b = a.to(dtype).float(), b.to(dtype).float()  # representable in every dtype
    scale = torch.tensor(10.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    rules = rule_sets(19, 24, a, b, scale.float())["all"]
    if dtype == torch.float64:
        check(backend, a, b, scale, dtype=dtype, normalize=True, **rules)
        return
    # fp16/bf16 features, fp32 accumulation: compared with the fp32 result on the same
    # (exactly representable) features, which decides every threshold the same way.
    half = mmkernels.similarity_logsumexp(a.to(dtype), b.to(dtype), scale, normalize=True,
                                          backend=backend, **rules)
    full = mmkernels.similarity_logsumexp(a, b, scale, normalize=True, backend=backend, **rules)
    for ours, want in zip(half, full):
        torch.testing.assert_close(ours, want, rtol=1e-2, atol=0.05)


@pytest.mark.parametrize("backend", MASKED_BACKENDS)
def test_large_scale_unnormalized(backend, small_tiles):
    check_large_scale_unnormalized(backend)


def check_large_scale_unnormalized(backend):
    a = torch.randn(20, 12) * torch.linspace(0.05, 5, 20).unsqueeze(1)
    b = torch.randn(30, 12) * 2
    scale = torch.tensor(100.0)
    s = 100 * a @ b.T
    row_t, col_t = s.quantile(0.7, dim=1) + 1e-2, s.quantile(0.7, dim=0) + 1e-2
    check(backend, a, b, scale, rtol=fp32_logit_rtol(s.abs().max().item()),
          row_threshold=row_t, col_threshold=col_t, row_groups=torch.arange(20) % 5,
          col_groups=torch.arange(30) % 5)


@pytest.mark.parametrize("backend", MASKED_BACKENDS)
def test_non_contiguous_inputs(backend, small_tiles):
    a, b = features(30, 22, 9, seed=7)
    a, b = a[::2], b.T.contiguous().T  # a strided view, and a column-major b
    rules = rule_sets(15, 22, a, b, torch.tensor(2.0))["all"]
    check(backend, a, b, torch.tensor(2.0), normalize=True, **rules)


def test_gradcheck_fp64():
    a, b = features(6, 7, 4, seed=8)
    a, b = a.double().requires_grad_(), b.double().requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    rules = dict(row_groups=torch.tensor([0, 1, 1, 2, 3, 3]),
                 col_groups=torch.tensor([0, 1, 1, 2, 3, 3, 4]),
                 row_threshold=torch.full((6,), 1.5, dtype=torch.float64),
                 exclude_diagonal=True, positives=torch.tensor([1, 0, 3, 2, 5, -1]))
    for backend in MASKED_BACKENDS:
        torch.autograd.gradcheck(
            lambda x, y, t: mmkernels.similarity_logsumexp(x, y, t, normalize=True,
                                                           backend=backend, **rules),
            (a, b, scale))


# Kernel ops: every masked backend but the reference. torch.compile cannot trace triton
# ops that the interpreter runs eagerly (the triton lane): their opcheck and compile
# run on GPU (test_cuda_triton_opcheck_and_compile).
KERNEL_BACKENDS = [name for name in MASKED_BACKENDS if name != "naive"]
TRACEABLE_BACKENDS = [name for name in KERNEL_BACKENDS if name != "triton"]


@pytest.mark.parametrize("backend", TRACEABLE_BACKENDS)
def test_opcheck(backend):
    a, b = features(9, 11, 5, seed=9)
    a.requires_grad_()
    b.requires_grad_()
    rules = masked_logsumexp.Exclusions.from_arguments(
        a, b, row_groups=torch.arange(9) % 2, col_groups=torch.arange(11) % 2,
        row_threshold=torch.zeros(9), col_threshold=torch.zeros(11))
    fwd, bwd = masked_logsumexp.KERNELS[backend]
    scale = torch.tensor(3.0, requires_grad=True)
    torch.library.opcheck(fwd, (a, b, scale, True, *rules.as_args()))
    row_lse, col_lse = fwd(a.detach(), b.detach(), scale.detach(), True, *rules.as_args())
    torch.library.opcheck(bwd, (a.detach(), b.detach(), scale.detach(), True, *rules.as_args(),
                                row_lse, col_lse, torch.randn(9), torch.randn(11), True, True))
    torch.library.opcheck(bwd, (a.detach(), b.detach(), scale.detach(), True, *rules.as_args(),
                                row_lse, col_lse, torch.randn(9), torch.randn(11), False, True))


@pytest.mark.parametrize("backend", TRACEABLE_BACKENDS)
@pytest.mark.parametrize("frozen", [False, True])
def test_compile_fullgraph(backend, frozen):
    a, b = features(12, 12, 6, seed=10)
    a.requires_grad_()
    b.requires_grad_(not frozen)
    groups = torch.arange(12) % 3
    threshold = torch.full((12,), 0.5)

    def loss(x, y):
        row_lse, col_lse = mmkernels.similarity_logsumexp(
            x, y, 5.0, normalize=True, row_groups=groups, col_groups=groups,
            row_threshold=threshold, backend=backend)
        return row_lse.sum() + col_lse.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    want = loss(a, b)
    got = compiled(a, b)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, a), torch.autograd.grad(want, a))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_opcheck_and_compile(backend):
    """The GPU backends' masked ops: opcheck, and torch.compile with a frozen side."""
    if backend not in masked_logsumexp.KERNELS:
        pytest.skip(f"no {backend} masked kernels in this process")
    a, b = (x.cuda() for x in features(70, 90, 24, seed=13))
    rules = masked_logsumexp.Exclusions.from_arguments(
        a, b, row_groups=torch.arange(70, device="cuda") % 5,
        col_groups=torch.arange(90, device="cuda") % 5,
        row_threshold=torch.zeros(70, device="cuda"), col_threshold=torch.zeros(90, device="cuda"))
    fwd, bwd = masked_logsumexp.KERNELS[backend]
    scale = torch.tensor(3.0, device="cuda")
    torch.library.opcheck(fwd, (a, b, scale, True, *rules.as_args()))
    row_lse, col_lse = fwd(a, b, scale, True, *rules.as_args())
    g_row, g_col = torch.rand_like(row_lse), torch.rand_like(col_lse)
    for compute in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(bwd, (a, b, scale, True, *rules.as_args(), row_lse, col_lse,
                                    g_row, g_col, *compute))

    def loss(x, y):
        row, col = mmkernels.similarity_logsumexp(
            x, y, 3.0, normalize=True, row_groups=rules.row_groups, col_groups=rules.col_groups,
            row_threshold=rules.row_threshold, backend=backend)
        return row.sum() + col.masked_fill(torch.isinf(col), 0.0).sum()

    x = a.clone().requires_grad_()
    want = torch.autograd.grad(loss(x, b), x)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, b), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- a frozen side: no gradient product for it ----------------------------------------

@pytest.mark.parametrize("backend", MASKED_BACKENDS)
@pytest.mark.parametrize("trainable", ["a", "b", "scale", "a+scale", "b+scale", "a+b+scale"])
def test_frozen_side_gradients_equal_the_full_backward(backend, small_tiles, trainable):
    a0, b0 = features(13, 21, 6, seed=11)
    rules = rule_sets(13, 21, a0, b0, torch.tensor(4.0))["all"]
    weights = torch.rand(13), torch.rand(21)

    def grads(wanted):
        a, b = a0.clone().requires_grad_("a" in wanted), b0.clone().requires_grad_("b" in wanted)
        scale = torch.tensor(4.0, requires_grad="scale" in wanted)
        row_lse, col_lse = mmkernels.similarity_logsumexp(a, b, scale, normalize=True,
                                                          backend=backend, **rules)
        total = (weights[0] * row_lse).sum() + (weights[1] * col_lse).sum()
        leaves = [x for x, name in ((a, "a"), (b, "b"), (scale, "scale")) if name in wanted]
        return dict(zip([n for n in ("a", "b", "scale") if n in wanted],
                        torch.autograd.grad(total, leaves)))

    full = grads("a+b+scale")
    before = products_computed(backend)
    frozen = grads(trainable)
    for name, grad in frozen.items():
        torch.testing.assert_close(grad, full[name], rtol=1e-5, atol=1e-6, msg=name)
    if before is not None:  # 3 products instead of 4 unless both sides train
        want = {"S": 1, "pb": int("a" in trainable or trainable == "scale"), "pa": int("b" in trainable)}
        after = products_computed(backend)
        assert {k: after[k] - before[k] for k in want} == want


def products_computed(backend):
    """The backward's product counts so far ({"S", "pb", "pa"}) on backends that keep
    them; None on the reference (plain autograd)."""
    if backend == "cpu":
        from mmkernels import compiled
        return dict(zip(("S", "pb", "pa"), compiled.products_computed()))
    if backend == "naive":
        return None
    return {k: masked_logsumexp.PRODUCTS_COMPUTED[k] for k in ("S", "pb", "pa")}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("frozen", ["a", "b", "a+b"])
def test_unmasked_primitive_with_a_frozen_side(backend, small_tiles, frozen):
    """No rule on, one side (or both: the scale alone trains) a constant: the same
    gradients as the full backward, with 3 products (2 for the scale alone)."""
    a0, b0 = features(11, 19, 5, seed=12)
    weights = torch.rand(11), torch.rand(19)

    def grads(frozen_sides, compile=False):
        a = a0.clone().requires_grad_("a" not in frozen_sides)
        b = b0.clone().requires_grad_("b" not in frozen_sides)
        scale = torch.tensor(3.0, requires_grad=True)

        def loss(a, b, scale):
            row_lse, col_lse = mmkernels.similarity_logsumexp(a, b, scale, normalize=True,
                                                              backend=backend)
            return (weights[0] * row_lse).sum() + (weights[1] * col_lse).sum()

        fn = torch.compile(loss, fullgraph=True, backend="aot_eager") if compile else loss
        named = {n: x for n, x in (("a", a), ("b", b), ("scale", scale)) if x.requires_grad}
        return dict(zip(named, torch.autograd.grad(fn(a, b, scale), list(named.values()))))

    full = grads("")
    before = products_computed(backend)
    frozen_grads = grads(frozen)
    after = products_computed(backend)
    want = {"S": 1, "pb": int(frozen != "a"), "pa": int(frozen == "a")}
    assert {k: after[k] - before[k] for k in want} == want
    runs = [frozen_grads] + ([grads(frozen, compile=True)] if backend in TRACEABLE_BACKENDS else [])
    for got in runs:
        assert set(got) == {"a", "b", "scale"} - set(frozen.split("+"))
        for name, grad in got.items():
            torch.testing.assert_close(grad, full[name], rtol=1e-5, atol=1e-6, msg=name)


# --- dispatch ---------------------------------------------------------------------

def test_no_rule_is_the_unmasked_primitive():
    a, b = features(8, 8, 4)
    plain = mmkernels.similarity_logsumexp(a, b, 2.0, backend="torch")
    with_positives = mmkernels.similarity_logsumexp(a, b, 2.0, backend="torch",
                                                    positives=torch.arange(8))
    for x, y in zip(plain, with_positives):
        assert torch.equal(x, y)


def test_auto_picks_a_backend_with_masked_kernels(monkeypatch):
    monkeypatch.delenv("MMKERNELS_BACKEND", raising=False)
    a, b = features(8, 9, 4)
    rules = dict(row_groups=torch.arange(8) % 2, col_groups=torch.arange(9) % 2)
    got = mmkernels.similarity_logsumexp(a, b, 2.0, **rules)
    want = mmkernels.similarity_logsumexp(a, b, 2.0, backend="torch", **rules)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


def test_a_backend_without_masked_kernels_refuses(monkeypatch):
    monkeypatch.delitem(masked_logsumexp.KERNELS._pairs, "torch")  # every backend has them now
    a, b = features(4, 4, 3)
    with pytest.raises(RuntimeError, match="backend 'torch' has no kernels for "
                                           "similarity_logsumexp with exclusions"):
        mmkernels.similarity_logsumexp(a, b, row_threshold=torch.zeros(4), backend="torch")


# --- errors, raised before any kernel, naming the argument -------------------------

N, M = 5, 6


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(row_groups=torch.zeros(N, dtype=torch.int64)), ValueError, "go together"),
    (dict(row_groups=torch.zeros(N, dtype=torch.int32), col_groups=torch.zeros(M, dtype=torch.int64)),
     TypeError, "row_groups: expected dtype int64"),
    (dict(row_groups=torch.zeros(N + 1, dtype=torch.int64), col_groups=torch.zeros(M, dtype=torch.int64)),
     ValueError, r"row_groups: expected shape \(5,\)"),
    (dict(row_groups=torch.zeros(N, dtype=torch.int64), col_groups=[0] * M),
     TypeError, "col_groups: expected a torch.Tensor"),
    (dict(row_threshold=torch.zeros(N, dtype=torch.int64)), TypeError, "row_threshold: expected a floating"),
    (dict(col_threshold=torch.zeros(N)), ValueError, r"col_threshold: expected shape \(6,\)"),
    (dict(row_threshold=torch.tensor([0.0, float("nan"), 0, 0, 0])), ValueError, "row_threshold: contains NaN"),
    (dict(row_threshold=torch.zeros(N), positives=torch.tensor([0, 1, 2, 3, 6])),
     ValueError, r"positives: values must lie in \[-1, 6\)"),
    (dict(row_threshold=torch.zeros(N), positives=torch.tensor([0, 1, 2, 3, -2])),
     ValueError, "positives: values must lie"),
    (dict(row_threshold=torch.zeros(N), positives=torch.zeros(N)), TypeError, "positives: expected dtype int64"),
    (dict(exclude_diagonal=True), ValueError, "exclude_diagonal: with the default positives"),
    (dict(exclude_diagonal=1, positives=torch.full((N,), -1)), TypeError, "exclude_diagonal: expected a bool"),
])
def test_bad_arguments(kwargs, error, match):
    a, b = features(N, M, 3)
    with pytest.raises(error, match=match):
        mmkernels.similarity_logsumexp(a, b, backend="torch", **kwargs)


def test_default_positives_need_as_many_columns_as_rows():
    a, b = features(6, 4, 3)
    with pytest.raises(ValueError, match="positives: the default .* needs M >= N"):
        mmkernels.similarity_logsumexp(a, b, row_threshold=torch.zeros(6), backend="torch")
    # with positives given, rectangular M < N is fine
    mmkernels.similarity_logsumexp(a, b, row_threshold=torch.zeros(6),
                                   positives=torch.tensor([0, 1, 2, 3, -1, -1]), backend="torch")


def test_rule_tensors_on_another_device():
    a, b = features(N, M, 3)
    with pytest.raises(ValueError, match="row_threshold: on meta, but the features are on cpu"):
        mmkernels.similarity_logsumexp(a, b, row_threshold=torch.zeros(N, device="meta"))
