"""The Triton kernels of the logsumexp primitive (mmkernels/triton/logsumexp.py), and
the losses built on it (contrastive_loss, info_nce) on the triton backend: what the
generic reference tests (tests/test_logsumexp.py, tests/test_contrastive.py, run on
the triton backend in the interpreter lane) do not reach.

- interpreter lane (tests/triton_fixtures.py): each internal path the small generic
  shapes may miss: the forward's row groups x column splits, the backward's P
  blocks, both forms of the exponentials, fp16's P scaling, D up to 4096, strides,
  bitwise determinism, autotuning trials, opcheck's eager checks;
- GPU (marked ``cuda``): values and gradients at real sizes, int64 offsets with
  N*D > 2^31, autotuning safety, peak memory.
"""

import pytest
import torch

import mmkernels
import reference
from loss_cases import LOGSUMEXP, largest_logit
from tolerances import fp32_logit_rtol
from triton_fixtures import (HAS_TRITON, assert_fwd_bwd_memory_bounded, autotuning_trials,  # noqa: F401  (fixture)
                             compiler, cuda_inputs, interpreter, requires_triton)

pytestmark = requires_triton

if HAS_TRITON:
    import triton

    import mmkernels.triton  # noqa: F401  (registers the kernels)
    from mmkernels.triton import _launch, logsumexp as lse_kernels


# --- interpreter lane: the kernels' internal paths -------------------------------

@interpreter
@pytest.mark.parametrize("sms", [1, 3, 8])
def test_forward_row_groups_and_column_splits(monkeypatch, sms):
    """The persistent forward grid at several (groups, splits), shapes straddling its 16 x 32 tiles."""
    monkeypatch.setattr(_launch, "INTERPRETER_SMS", sms)
    n, m = 53, 71
    split = _launch.forward_split(triton.cdiv(n, 16), triton.cdiv(m, 32), sms)
    assert split[0] * split[1] <= max(_launch.PROGRAMS_PER_SM * sms, 1)
    a, b = torch.randn(n, 19), torch.randn(m, 19)
    for normalize in (False, True):
        LOGSUMEXP.compare("triton", [a, b], torch.float32, scale=torch.tensor(6.0),
                          what=f"split {split} normalize={normalize}", normalize=normalize)


@interpreter
@pytest.mark.parametrize("block", [(16, 32), (7, 9), (100, 100)])
def test_backward_p_blocks(monkeypatch, block):
    """pb, pa accumulated over P blocks of any size (not multiples of the tiles, or one block)."""
    monkeypatch.setattr(_launch, "INTERPRETER_P_BLOCK", block)
    a, b = torch.randn(37, 21), torch.randn(45, 21)
    LOGSUMEXP.compare("triton", [a, b], torch.float32, scale=torch.tensor(9.0), what=f"P block {block}",
                      normalize=True)


def _spread_features():
    """Unnormalized features whose logits at scale 100 span thousands, with one
    row that dwarfs every other in the tile: the one-exp forms would lose the
    other columns' sums (forward) and the other rows' column softmax (backward)."""
    a = torch.randn(20, 12) * 0.3
    b = torch.randn(30, 12) * 0.3
    a[0] = 8 * b[1] / b[1].norm()   # S[0, 1] ~ +800, S[0, j] far below for most j
    a[5] = -6 * b[3] / b[3].norm()
    return a, b


@interpreter
@pytest.mark.parametrize("fast_range", ["default", "never"])
def test_exp_forms_agree_with_reference(monkeypatch, fast_range):
    """Both forms of the exponentials (one exp per logit, or two) are exact where used."""
    if fast_range == "never":
        monkeypatch.setattr(lse_kernels, "FAST_RANGE", -1.0)
    a, b = torch.randn(29, 16), torch.randn(35, 16)
    LOGSUMEXP.compare("triton", [a, b], torch.float32, scale=torch.tensor(30.0),
                      what=f"benign, fast range {fast_range}", normalize=True)
    a, b = _spread_features()
    largest = largest_logit(a, b)
    LOGSUMEXP.compare("triton", [a, b], torch.float32, scale=torch.tensor(100.0),
                      what=f"spread, fast range {fast_range}", rtol=fp32_logit_rtol(largest))


@interpreter
def test_one_exp_form_alone_would_fail_where_the_guard_refuses_it(monkeypatch):
    """The per-tile guard matters: forcing the one-exp forms on the spread features
    gives wrong column statistics and gradients; the guarded kernels get them right."""
    a, b = _spread_features()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    row_ref, col_ref = reference.logsumexp(a64, b64, 100.0)
    grads_ref = torch.autograd.grad(row_ref.sum() + col_ref.sum(), (a64, b64))

    def run():
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        row, col = mmkernels.similarity_logsumexp(x, y, 100.0, backend="triton")
        grads = torch.autograd.grad(row.sum() + col.sum(), (x, y))
        return col, grads

    col, grads = run()
    torch.testing.assert_close(col.double(), col_ref, rtol=1e-5, atol=1e-3)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-3 * r.abs().max().item())
    monkeypatch.setattr(lse_kernels, "FAST_RANGE", float("inf"))
    col_forced, grads_forced = run()
    col_wrong = not torch.allclose(col_forced.double(), col_ref, rtol=1e-5, atol=1e-3)
    grad_wrong = not torch.allclose(grads_forced[1].double(), grads_ref[1], rtol=1e-4,
                                    atol=1e-3 * grads_ref[1].abs().max().item())
    assert col_wrong and grad_wrong


@interpreter
def test_fp16_p_is_scaled_into_range(monkeypatch):
    """fp16 P is stored times a power of two (|sigma * P| <= 1): with a small upstream
    gradient, P's entries (~1e-5 times a softmax) would sit among fp16's subnormals
    and flush to zero; scaled, they keep fp16's full precision."""
    a = torch.randn(24, 16, dtype=torch.float16)
    b = torch.randn(40, 16, dtype=torch.float16)
    a64, b64 = (x.double().requires_grad_() for x in (a, b))
    row64, col64 = reference.logsumexp(a64, b64, 20.0, normalize=True)
    want = torch.autograd.grad((row64.sum() + col64.sum()) * 1e-5, (a64, b64))

    def error():
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        row, col = mmkernels.similarity_logsumexp(x, y, 20.0, normalize=True, backend="triton")
        got = torch.autograd.grad((row.sum() + col.sum()) * 1e-5, (x, y))
        return max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))

    scaled = error()
    monkeypatch.setattr(lse_kernels, "lse_p_scale", lambda dtype, g_row, g_col: torch.ones_like(g_row[0]))
    unscaled = error()
    assert scaled < 2e-3 < unscaled, (scaled, unscaled)


@interpreter
def test_deterministic_bitwise():
    """No atomics: two runs agree bit for bit, with torch's deterministic mode on."""
    a, b = torch.randn(45, 33), torch.randn(45, 33)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            s = torch.tensor(7.0, requires_grad=True)
            loss = mmkernels.contrastive_loss(x, y, s, normalize=True, backend="triton")
            loss.backward()
            results.append([loss.detach(), x.grad, y.grad, s.grad])
    finally:
        torch.use_deterministic_algorithms(previous)
    for first, second in zip(*results):
        assert torch.equal(first, second)


@interpreter
def test_autotuning_trials_leave_no_trace(autotuning_trials):  # noqa: F811
    """Autotuning runs every candidate before the winner: the forward's partials
    and the backward's accumulated products must come out as if only the winner
    had run."""
    a, b = torch.randn(53, 20), torch.randn(71, 20)
    LOGSUMEXP.compare("triton", [a, b], torch.float32, scale=torch.tensor(5.0), what="after autotuning",
                      normalize=True)
    assert len(autotuning_trials) >= 6  # both candidates of the forward, P and products kernels


@interpreter
@pytest.mark.parametrize("d", [1000, 4096])
def test_large_feature_dimension(d):
    """D up to 4096, not only powers of two, at small N (the K-loops run long)."""
    a, b = torch.randn(5, d), torch.randn(7, d)
    LOGSUMEXP.compare("triton", [a, b], torch.float32, scale=torch.tensor(10.0), what=f"D={d}",
                      normalize=True)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_noncontiguous_transposed_storage(dtype):
    """Features stored transposed (stride along D is N), half precision, normalized."""
    a = torch.randn(24, 33).T.to(dtype)            # (33, 24), stride (1, 33)
    b = torch.randn(24, 40)[:, ::2].T.to(dtype)    # (20, 24), strides (2, 40)
    assert a.stride(1) != 1 and b.stride(1) != 1
    LOGSUMEXP.compare("triton", [a, b], dtype, scale=torch.tensor(25.0), what=f"{dtype} transposed",
                      normalize=True)


@interpreter
def test_opcheck_schema_autograd_and_fake_kernels():
    """opcheck's eager checks on the primitive's ops (tracing them needs a GPU:
    tests/test_compile.py)."""
    from mmkernels.ops import logsumexp

    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    fwd, bwd = logsumexp.KERNELS["triton"]
    a = torch.randn(9, 5, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(7, 5, dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    for normalize in (False, True):
        torch.library.opcheck(fwd, (a, b, s, normalize), test_utils=checks)
        row, col = fwd(a, b, s, normalize)
        torch.library.opcheck(bwd, (a.detach(), b.detach(), s.detach(), normalize, row, col,
                                    torch.rand_like(row), torch.rand_like(col)), test_utils=checks)


# --- the masked primitive: the same kernels with rules on ---------------------------

def _masked_kernels():
    from mmkernels.ops import masked_logsumexp

    return masked_logsumexp.KERNELS["triton"]


def _all_rules(a, b):
    """Every rule on, thresholds through the middle of the logits (5 * S, normalized),
    off any logit (a tie may be decided apart by fp32 and an fp64 reference)."""
    from mmkernels.ops import masked_logsumexp

    n, m = a.shape[0], b.shape[0]
    s = 5 * torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    return masked_logsumexp.Exclusions.from_arguments(
        a, b, exclude_diagonal=True, positives=(torch.arange(n) + 3) % m,
        row_groups=torch.arange(n) % 4, col_groups=torch.arange(m) % 4,
        row_threshold=s.median(1).values + 1e-3, col_threshold=s.median(0).values + 1e-3).as_args()


@interpreter
def test_no_rule_is_the_unmasked_primitive_bit_for_bit():
    """The masked ops with every rule off (positives given, as the frozen-side route
    of the unmasked primitive passes them) run the unmasked kernels: same bits,
    and a frozen side's product equals the full backward's."""
    a, b, scale = torch.randn(37, 21), torch.randn(45, 21), torch.tensor(6.0)
    rules = (False, torch.arange(37), None, None, None, None)
    fwd, bwd = _masked_kernels()
    plain = lse_kernels.triton_lse_fwd(a, b, scale, True)
    masked = fwd(a, b, scale, True, *rules)
    for x, y in zip(plain, masked):
        assert torch.equal(x, y)
    g_row, g_col = torch.rand(37), torch.rand(45)
    full = lse_kernels.triton_lse_bwd(a, b, scale, True, *plain, g_row, g_col)
    both = bwd(a, b, scale, True, *rules, *plain, g_row, g_col, True, True)
    only_pb = bwd(a, b, scale, True, *rules, *plain, g_row, g_col, True, False)
    only_pa = bwd(a, b, scale, True, *rules, *plain, g_row, g_col, False, True)
    for x, y in zip(full, both):
        assert torch.equal(x, y)
    assert torch.equal(only_pb[0], full[0]) and only_pb[1].shape == (0,)
    assert torch.equal(only_pa[1], full[1]) and only_pa[0].shape == (0,)


@interpreter
@pytest.mark.parametrize("compute", [(True, False), (False, True)])
def test_frozen_side_launches_one_product(monkeypatch, compute):
    """A product not asked for gets no program: every launch of the products kernel
    covers the tiles of one problem only."""
    from mmkernels.triton import matmul

    launches = []
    launch = _launch.launch

    def recording(kernel, grid, *args, **kwargs):
        if getattr(kernel, "fn", kernel) is matmul._products_kernel:
            launches.append((grid({"BLOCK_R": 16, "BLOCK_D": 32}), args[4], args[17]))
        launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_launch, "launch", recording)
    a, b, scale = torch.randn(30, 40), torch.randn(50, 40), torch.tensor(3.0)
    rules = _all_rules(a, b)
    fwd, bwd = _masked_kernels()
    row, col = fwd(a, b, scale, False, *rules)
    pb, pa = bwd(a, b, scale, False, *rules, row, col, torch.rand(30), torch.rand(50), *compute)
    assert launches and (pb.numel() > 0) == compute[0] and (pa.numel() > 0) == compute[1]
    for (programs,), rows, _ in launches:
        assert programs == triton.cdiv(rows, 16) * triton.cdiv(40, 32)


@interpreter
def test_masked_autotuning_trials_leave_no_trace(autotuning_trials):  # noqa: F811
    """The masked kernels under autotuning (every rule on; two candidates for the P
    and products kernels, the forward keeps its first): the trials' products leave
    the results of the winner alone."""
    from mmkernels.ops import masked_logsumexp

    a, b, scale = torch.randn(53, 20), torch.randn(71, 20), torch.tensor(5.0)
    rules = _all_rules(a, b)
    fwd, bwd = _masked_kernels()
    got = fwd(a, b, scale, True, *rules)
    want = masked_logsumexp.fwd_reference(a.double(), b.double(), scale.double(), True,
                                          *_as_double(rules))
    for x, y in zip(got, want):
        finite = torch.isfinite(y)
        assert torch.equal(torch.isfinite(x), finite)
        torch.testing.assert_close(x[finite].double(), y[finite], rtol=1e-5, atol=1e-5)
    g_row, g_col = torch.rand(53), torch.rand(71)
    grads = bwd(a, b, scale, True, *rules, *got, g_row, g_col, True, True)
    want = masked_logsumexp.bwd_reference(a.double(), b.double(), scale.double(), True, *_as_double(rules),
                                          *(x.double() for x in got), g_row.double(), g_col.double(),
                                          True, True)
    for x, y in zip(grads, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-5)
    assert len(autotuning_trials) >= 4


def _as_double(rules):
    return tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in rules)


def tie_flips(fwd_tile=None, bwd_tile=None, n=64, m=96, d=200, seed=0):
    """(flips, dropped, rows): a row threshold set exactly at each row's largest logit
    as torch computes it (fp32, on CPU), under the interpreter. ``dropped``: rows whose
    tie the forward excluded (its S above torch's in the last bit); ``flips``: rows whose
    backward decided the tie otherwise than the forward. ``fwd_tile``/``bwd_tile``:
    (BLOCK_M, BLOCK_N, BLOCK_K) of each pass (default: the interpreter's one config).
    Each decision is read off the results: the forward's from row_lse (the tie is the
    row's largest term), the backward's from the row sum of P (1 when it keeps the
    forward's entries), through a column of ones in b."""
    from mmkernels.ops import masked_logsumexp

    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    b[:, -1] = 1.0
    s = a @ b.T
    top = s.max(1).values
    rules = masked_logsumexp.Exclusions.from_arguments(
        a, b, row_threshold=top, positives=torch.full((n,), -1)).as_args()
    s64 = a.double() @ b.double().T
    keep = torch.logsumexp(s64, 1)
    drop = torch.logsumexp(s64.scatter(1, s.argmax(1, keepdim=True), float("-inf")), 1)
    fwd, bwd = _masked_kernels()
    one = torch.tensor(1.0)

    def run(tile, kernel, *args):
        saved = _launch._INTERPRETER_CONFIGS["tile"]
        if tile is not None:
            block_m, block_n, block_k = tile
            _launch._INTERPRETER_CONFIGS["tile"] = [triton.Config(
                {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=4, num_stages=1)]
        _launch._autotuner.cache_clear()
        try:
            return kernel(*args)
        finally:
            _launch._INTERPRETER_CONFIGS["tile"] = saved
            _launch._autotuner.cache_clear()

    row_lse, col_lse = run(fwd_tile, fwd, a, b, one, False, *rules)
    fwd_kept = (row_lse.double() - keep).abs() < (row_lse.double() - drop).abs()
    pb, _ = run(bwd_tile, bwd, a, b, one, False, *rules, row_lse, col_lse, torch.ones(n), torch.zeros(m),
                True, False)
    excess = pb[:, -1].double() - 1.0  # -p(tie) if only the forward kept it, +p if only the backward
    p_tie = torch.exp(top.double() - torch.where(fwd_kept, keep, drop))
    bwd_kept = torch.where(fwd_kept, excess.abs() < p_tie / 2, excess > p_tie / 2)
    return int((fwd_kept != bwd_kept).sum()), int((~fwd_kept).sum()), n


def numpy_sums_blocks_alike() -> bool:
    """Whether numpy's matmul (the interpreter's tl.dot) gives a block product the same
    bits whatever the block's shape and layout. OpenBLAS's FMA kernels (Haswell, Zen)
    do not; its AVX kernels do, which the interpreter lane selects
    (OPENBLAS_CORETYPE=Sandybridge, tests/test_triton_lane.py)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for bm, bk, bn in ((64, 16, 96), (32, 16, 64), (16, 32, 16)):
        a = rng.standard_normal((bm, bk)).astype(np.float32)
        b = rng.standard_normal((bn, bk)).astype(np.float32)
        whole = a @ b.T
        if not (np.array_equal(whole[: bm // 2], a[: bm // 2] @ b.T)
                and np.array_equal(whole, (b @ a.T).T)):
            return False
    return True


@interpreter
def test_forward_and_backward_decide_ties_alike():
    """A threshold exactly at a logit: the backward recomputes S with the forward's
    operations in the forward's order (same BLOCK_K), so no decision flips, even with
    other tile shapes; the forward's own decisions differ from torch's in some rows
    (its S is not torch's to the last bit), which is why the measurement can see flips.
    The interpreter's dot must itself sum in one order for that to show."""
    if not numpy_sums_blocks_alike():
        pytest.skip("numpy's BLAS sums a block product in a shape-dependent order on this CPU; "
                    "the interpreter lane runs this test with OPENBLAS_CORETYPE=Sandybridge")
    flips, dropped, rows = tie_flips()
    assert flips == 0 and 0 < dropped < rows
    assert tie_flips((16, 32, 16), (32, 16, 16))[0] == 0


def _masked_launches(arch_name, dtype, n=4096, m=4096, d=768):
    """The masked kernels' launches as the launchers make them: every rule on (two
    exps per logit, the largest variant), and the diagonal with groups (one exp)."""
    import triton_aot
    from mmkernels.ops import masked_logsumexp

    a, b = torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)
    scale, lse_r, lse_c = torch.tensor(3.0), torch.randn(n), torch.randn(m)
    groups = dict(exclude_diagonal=True, positives=torch.full((n,), -1),
                  row_groups=torch.arange(n) % 7, col_groups=torch.arange(m) % 7)
    every = dict(groups, row_threshold=torch.zeros(n), col_threshold=torch.zeros(m))
    with triton_aot.recording(arch_name) as calls:
        for kwargs in (every, groups):
            rules = masked_logsumexp.Exclusions.from_arguments(a, b, **kwargs).as_args()
            lse_kernels._forward(a, b, scale, True, rules)
            lse_kernels._backward(a, b, scale, True, lse_r, lse_c, torch.rand(n), torch.rand(m), rules)
    # One launch per kernel and set of rules (the P blocks differ only in their offsets).
    unique = {}
    for kernel, grid, args, kwargs in calls:
        name = getattr(kernel, "fn", kernel).__name__
        if name in ("_lse_fwd_kernel", "_lse_bwd_p_kernel"):
            unique.setdefault((name, kwargs["HAS_ROW_THRESHOLD"]), (kernel, grid, args, kwargs))
    return list(unique.values())


@compiler
@pytest.mark.parametrize("arch_name", ["sm90", "sm80"])
def test_masked_kernels_compile_without_spills(arch_name):
    """The masked variants of the forward and P kernels, compiled by Triton for the
    target with their first autotune candidate (bf16), spill no register. (Triton 3.6
    gives the masked forward an 8 to 16-byte stack frame on sm90 with groups and on
    sm80 with thresholds, 3.9 none: a few bytes are allowed there.)"""
    import triton_aot
    from mmkernels.triton._compat import TRITON_VERSION

    allowed = 16 if TRITON_VERSION < (3, 8) else 0

    calls = _masked_launches(arch_name, torch.bfloat16)
    assert len(calls) == 4
    for kernel, _, args, kwargs in calls:
        try:
            compiled = triton_aot.compile_call(kernel.fn, args, kwargs, kernel.configs[0],
                                               triton_aot.TARGETS[arch_name])
        except (AttributeError, TypeError, ImportError) as error:  # Triton internals moved
            pytest.skip(f"triton {triton.__version__}: AOT internals differ ({error})")
        usage = triton_aot.resource_usage(compiled)
        assert usage.get("local", 0) == 0 and usage.get("stack", 0) <= allowed, (kernel.fn.__name__, usage)


# --- GPU ----------------------------------------------------------------------------

def _grads_vs_fp64(fn, ref, a, b, scale):
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    s = torch.tensor(scale, device="cuda", requires_grad=True)
    out = fn(x, y, s)
    out.backward()
    x64, y64 = a.double().requires_grad_(), b.double().requires_grad_()
    s64 = torch.tensor(scale, device="cuda", dtype=torch.float64, requires_grad=True)
    want = ref(x64, y64, s64)
    want.backward()
    return [(out.detach(), want.detach()), (x.grad, x64.grad), (y.grad, y64.grad), (s.grad, s64.grad)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,m,d", [(4096, 4096, 768), (3001, 5003, 520), (1, 257, 64)])
def test_cuda_losses_match_fp64(dtype, n, m, d):
    """Square: the CLIP loss; rectangular: InfoNCE. Value and every gradient vs fp64."""
    a, b = cuda_inputs(n, m, d, dtype)

    def ours(x, y, s):
        if n == m:
            return mmkernels.contrastive_loss(x, y, s, normalize=True, backend="triton")
        return mmkernels.info_nce(x, y, None, s, normalize=True, backend="triton")

    def ref(x, y, s):
        if n == m:
            return reference.contrastive(x, y, s, normalize=True)
        return reference.info_nce(x, y, None, s, normalize=True)

    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    for got, want in _grads_vs_fp64(ours, ref, a, b, 14.3):
        error = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        assert error < tol, f"{dtype} {n}x{m}x{d}: relative error {error:.3g}"


@pytest.mark.cuda
def test_cuda_unnormalized_scale_100():
    a, b = cuda_inputs(2048, 2048, 256, torch.float32)
    a = a * torch.linspace(0.1, 3, 2048, device="cuda").unsqueeze(1)
    largest = largest_logit(a, b)
    compare_tol = fp32_logit_rtol(largest) * 10
    for got, want in _grads_vs_fp64(lambda x, y, s: mmkernels.contrastive_loss(x, y, s, backend="triton"),
                                    lambda x, y, s: reference.contrastive(x, y, s), a, b, 100.0):
        error = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert error < compare_tol


@pytest.mark.cuda
def test_cuda_int64_offsets():
    """N * D > 2^31 elements: rows past 2^31 / D must come out right."""
    free, _ = torch.cuda.mem_get_info()
    n, d = 2**21 + 3, 1024                      # 4 GiB of bf16; pb and the epilogue's fp32 copies 8 GiB each
    if free < 48 * 2**30:
        pytest.skip("needs 48 GiB of free GPU memory")
    a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(64, d, device="cuda", dtype=torch.bfloat16)
    a.requires_grad_()
    row, col = mmkernels.similarity_logsumexp(a, b, 5.0, normalize=True, backend="triton")
    (row.sum() + col.sum()).backward()
    tail = a.detach()[-1000:].double()
    tail_ref = reference.logsumexp(tail, b.double(), 5.0, normalize=True)[0]
    torch.testing.assert_close(row[-1000:].double(), tail_ref, rtol=1e-3, atol=1e-3)
    assert torch.isfinite(a.grad[-1000:]).all() and a.grad[-1000:].abs().sum() > 0


@pytest.mark.cuda
def test_cuda_first_call_autotunes_without_corrupting_outputs():
    """Autotuning reruns launches; the backward's accumulating products restore their
    outputs, so the first (tuning) call and a later one agree."""
    a, b = cuda_inputs(5000, 4500, 384, torch.bfloat16)    # several P blocks in each direction
    results = []
    for _ in range(2):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        row, col = mmkernels.similarity_logsumexp(x, y, 10.0, normalize=True, backend="triton")
        (row.sum() + 2 * col.sum()).backward()
        results.append([row, col, x.grad, y.grad])
    for first, second in zip(*results):
        torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_extra_memory_is_bounded():
    """Peak memory of fwd+bwd beyond inputs, grads and the contract's fp32 pb/pa:
    the P block and O(N) statistics, never S."""
    assert_fwd_bwd_memory_bounded(
        lambda a, b, **options: mmkernels.contrastive_loss(a, b, 10.0, backend="triton", **options))
