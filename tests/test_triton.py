"""Triton-specific tests: what the generic reference tests do not reach.

Three kinds, by where they can run:

- kernels on CPU tensors under TRITON_INTERPRET=1: the interpreter lane runs
  this file in its own process (tests/test_triton_lane.py); in the main
  process (no interpreter) those tests skip, as triton cannot run CPU tensors
  there. They force each internal path the small generic shapes may miss: the
  forward's row groups x column splits, the backward's P blocks, both forms of
  the exponentials, fp16's P scaling, D up to 4096, int64 offsets, strides;
- pure Python (configs, grid splits, precision), and the ahead-of-time
  compilation of every kernel for sm90/sm80 (main process only: the
  interpreter replaces the compiler);
- GPU tests, marked ``cuda`` (skipped cleanly without a GPU): values and
  gradients at real sizes, int64 offsets with N*D > 2^31, opcheck,
  torch.compile(fullgraph=True) through the triton ops, autotuning safety.

The SigLIP kernels (mmkernels/triton/siglip.py) get the same three kinds, in
their own sections; the generic siglip tests (tests/test_siglip.py) run on
the triton backend in the interpreter lane too.
"""

import functools
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import mmkernels
import reference
from compare_to_reference import compare
from tolerances import fp32_logit_rtol

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="kernels on CPU tensors run in the interpreter lane (tests/test_triton_lane.py)")
compiler = pytest.mark.skipif(INTERPRETING, reason="the interpreter replaces the compiler")

if HAS_TRITON:
    import triton
    import triton.language as tl

    import mmkernels.triton  # noqa: F401  (registers the kernels)
    from mmkernels.ops import siglip as siglip_op
    from mmkernels.triton import _launch, logsumexp as lse_kernels, siglip as siglip_kernels


def _lse(**kw):
    return lambda a, b, s: mmkernels.similarity_logsumexp(a, b, s, backend="triton", **kw)


def _lse_ref(**kw):
    return lambda a, b, s: reference.logsumexp(a, b, s, **kw)


def _clip(**kw):
    return lambda a, b, s: mmkernels.contrastive_loss(a, b, s, backend="triton", **kw)


def _clip_ref(**kw):
    return lambda a, b, s: reference.contrastive(a, b, s, **kw)


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
        compare(_lse(normalize=normalize), _lse_ref(normalize=normalize), [a, b], torch.float32,
                scale=torch.tensor(6.0), what=f"split {split} normalize={normalize}")


@interpreter
@pytest.mark.parametrize("block", [(16, 32), (7, 9), (100, 100)])
def test_backward_p_blocks(monkeypatch, block):
    """pb, pa accumulated over P blocks of any size (not multiples of the tiles, or one block)."""
    monkeypatch.setattr(_launch, "INTERPRETER_P_BLOCK", block)
    a, b = torch.randn(37, 21), torch.randn(45, 21)
    compare(_lse(normalize=True), _lse_ref(normalize=True), [a, b], torch.float32,
            scale=torch.tensor(9.0), what=f"P block {block}")


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
    compare(_lse(normalize=True), _lse_ref(normalize=True), [a, b], torch.float32,
            scale=torch.tensor(30.0), what=f"benign, fast range {fast_range}")
    a, b = _spread_features()
    largest = (100 * a @ b.T).abs().max().item()
    compare(_lse(), _lse_ref(), [a, b], torch.float32, scale=torch.tensor(100.0),
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


@pytest.fixture
def autotuning_trials(monkeypatch):
    """Two autotune candidates per kernel under the interpreter; yields the list of
    trials run. The first candidates have fewer row groups / larger tiles than the
    last ones tried. (The interpreter cannot time kernels: a stand-in benchmark
    runs each trial twice and ranks earlier candidates faster.)"""
    tile = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]
    mm = [triton.Config({"BLOCK_R": 32, "BLOCK_D": 32, "BLOCK_K": 16}),
          triton.Config({"BLOCK_R": 16, "BLOCK_D": 16, "BLOCK_K": 16})]
    trials = []

    def bench(fn, quantiles=None, **kwargs):
        trials.append(fn)
        fn()
        fn()
        return [float(len(trials))] * 3

    monkeypatch.setattr(_launch, "configs", lambda kind, arch, dclass: tile if kind == "tile" else mm)
    monkeypatch.setattr(triton, "autotune", functools.partial(triton.autotune, do_bench=bench))
    monkeypatch.setattr(_launch, "INTERPRETER_SMS", 8)
    _launch._autotuner.cache_clear()
    try:
        yield trials
    finally:
        _launch._autotuner.cache_clear()


@interpreter
def test_autotuning_trials_leave_no_trace(autotuning_trials):
    """Autotuning runs every candidate before the winner: the forward's partials
    and the backward's accumulated products must come out as if only the winner
    had run."""
    a, b = torch.randn(53, 20), torch.randn(71, 20)
    compare(_lse(normalize=True), _lse_ref(normalize=True), [a, b], torch.float32,
            scale=torch.tensor(5.0), what="after autotuning")
    assert len(autotuning_trials) >= 6  # both candidates of the forward, P and products kernels


@interpreter
@pytest.mark.parametrize("d", [1000, 4096])
def test_large_feature_dimension(d):
    """D up to 4096, not only powers of two, at small N (the K-loops run long)."""
    a, b = torch.randn(5, d), torch.randn(7, d)
    compare(_lse(normalize=True), _lse_ref(normalize=True), [a, b], torch.float32,
            scale=torch.tensor(10.0), what=f"D={d}")


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_noncontiguous_transposed_storage(dtype):
    """Features stored transposed (stride along D is N), half precision, normalized."""
    a = torch.randn(24, 33).T.to(dtype)            # (33, 24), stride (1, 33)
    b = torch.randn(24, 40)[:, ::2].T.to(dtype)    # (20, 24), strides (2, 40)
    assert a.stride(1) != 1 and b.stride(1) != 1
    compare(_lse(normalize=True), _lse_ref(normalize=True), [a, b], dtype,
            scale=torch.tensor(25.0), what=f"{dtype} transposed")


@interpreter
def test_similarity_half_and_strided():
    """normalized_similarity with fp16 features at scale 100, strided, odd shapes."""
    a = torch.randn(40, 30)[::2, 1:28].half().requires_grad_()   # (20, 27)
    b = torch.randn(27, 33).T.half().requires_grad_()            # (33, 27)
    s = torch.tensor(100.0, requires_grad=True)
    out = mmkernels.normalized_similarity(a, b, s)
    a64, b64, s64 = (x.detach().double().requires_grad_() for x in (a, b, s))
    want = s64 * F.normalize(a64, dim=-1) @ F.normalize(b64, dim=-1).T
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=0.1)
    weight = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * weight).sum(), (a, b, s))
    ref = torch.autograd.grad((want * weight).sum(), (a64, b64, s64))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-2, atol=1e-2 * r.abs().max().item())


@interpreter
def test_int64_row_offsets():
    """row * stride past 2^31 is computed in int64 (CPU memory cannot hold such a
    tensor here; the GPU test below runs one)."""

    @triton.jit
    def offsets_kernel(out_ptr, start, num_rows, stride, BLOCK: tl.constexpr):
        from mmkernels.triton.matmul import row_offsets
        rows = start + tl.arange(0, BLOCK)
        tl.store(out_ptr + tl.arange(0, BLOCK), row_offsets(rows, num_rows, stride))

    out = torch.empty(16, dtype=torch.int64)
    start, num_rows, stride = 2**21, 2**21 + 9, 4096
    offsets_kernel[(1,)](out, start, num_rows, stride, BLOCK=16)
    expected = [((start + k) % num_rows) * stride for k in range(16)]
    assert out.tolist() == expected and max(expected) > 2**31


@interpreter
def test_fp32_matmul_precision_setting_is_honoured():
    """fp32 inputs follow torch.get_float32_matmul_precision() (tf32 under "high")."""
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert _launch.input_precision(torch.float32) == "tf32"
        a, b = torch.randn(17, 12), torch.randn(17, 12)
        compare(_clip(normalize=True), _clip_ref(normalize=True), [a, b], torch.float32,
                scale=torch.tensor(5.0), what="tf32 setting")  # the interpreter multiplies exactly
    finally:
        torch.set_float32_matmul_precision(previous)


@interpreter
def test_triton_available_on_cpu_under_the_interpreter():
    assert mmkernels.backends.why_unavailable("triton", torch.device("cpu")) is None
    assert "triton" in mmkernels.available_backends("cpu")


@interpreter
def test_opcheck_schema_autograd_and_fake_kernels():
    """opcheck's eager checks on all four ops (tracing them needs a GPU, below)."""
    from mmkernels.ops import logsumexp, similarity

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
    sfwd, sbwd = similarity.KERNELS["triton"]
    torch.library.opcheck(sfwd, (a, b, s), test_utils=checks)
    torch.library.opcheck(sbwd, (a.detach(), b.detach(), s.detach(), torch.randn(9, 7, dtype=torch.bfloat16)),
                          test_utils=checks)


@interpreter
def test_tracing_under_the_interpreter_says_why_it_cannot():
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: mmkernels.contrastive_loss(a, b, backend="triton"), fullgraph=True)
    with pytest.raises(Exception, match="TRITON_INTERPRET"):
        fn(torch.randn(5, 3), torch.randn(5, 3))


# --- interpreter lane: the SigLIP kernels ------------------------------------------

def _siglip_contract(n, m, d, positives, normalize, scale=7.0, bias=-3.0, dtype=torch.float32,
                     a=None, b=None):
    """The triton siglip fwd/bwd ops against fwd_reference/bwd_reference (fp64), per element."""
    fwd, bwd = siglip_op.KERNELS["triton"]
    a = torch.randn(n, d) * 2 if a is None else a
    b = torch.randn(m, d) if b is None else b
    a, b = a.to(dtype), b.to(dtype)
    s, t = torch.tensor(scale), torch.tensor(bias)
    g_row = torch.randn(n)
    args64 = (a.double(), b.double(), s.double(), t.double(), normalize, positives)
    got = fwd(a, b, s, t, normalize, positives)
    want = siglip_op.fwd_reference(*args64)
    rtol = fp32_logit_rtol((scale * a.double() @ b.double().T).abs().max().item() + abs(bias))
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * want.abs().max().item(),
                               msg=lambda m: f"row losses: {m}")
    got = bwd(a, b, s, t, normalize, positives, g_row)
    want = siglip_op.bwd_reference(*args64, g_row.double())
    for name, x, w in zip(("pb", "pa", "p_row"), got, want):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), w, rtol=rtol, atol=rtol * w.abs().max().item() + 1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


@interpreter
@pytest.mark.parametrize("block", [(16, 32), (7, 9), (100, 100)])
@pytest.mark.parametrize("positives", [True, False])
@pytest.mark.parametrize("n,m", [(37, 45), (45, 23)])
def test_siglip_blocks_and_diagonal(monkeypatch, block, positives, n, m):
    """Rectangular problems over P blocks of any size (not multiples of the tiles, or
    one block), with the positives on the global diagonal crossing block edges (or
    none: the distributed ring's remote blocks), and the forward's persistent grid
    at several column splits."""
    monkeypatch.setattr(_launch, "INTERPRETER_P_BLOCK", block)
    monkeypatch.setattr(_launch, "INTERPRETER_SMS", 3)
    for normalize in (False, True):
        _siglip_contract(n, m, 21, positives, normalize)


@interpreter
@pytest.mark.parametrize("d", [1000, 4096])
def test_siglip_large_feature_dimension(d):
    """D up to 4096, not only powers of two, at small N (the K-loops run long)."""
    _siglip_contract(5, 7, d, True, True, scale=10.0)
    _siglip_contract(6, 3, d, False, False, scale=0.05)


@interpreter
@pytest.mark.parametrize("positives", [True, False])
def test_siglip_large_logits_scale_100_bias_minus_10(positives):
    """Unnormalized features at scale 100, bias -10: |x| in the thousands, both signs,
    so softplus and the sigmoids see every range (overflowing exp included)."""
    a = torch.randn(19, 12) * torch.linspace(0.1, 4, 19).unsqueeze(1)
    b = torch.randn(27, 12) * 3
    assert (100 * a @ b.T).abs().max() > 1000
    _siglip_contract(19, 27, 12, positives, False, scale=100.0, bias=-10.0, a=a, b=b)


@interpreter
def test_softplus_keeps_relative_precision_everywhere():
    """The kernels' log1p(t) = log(w) + (t - (w - 1)) is fp32-exact for every u: no
    overflow, and tiny losses (learnt pairs) to full relative precision, where
    log(1 + exp(u)) would give exactly 0."""

    @triton.jit
    def softplus_kernel(u_ptr, out_ptr, BLOCK: tl.constexpr):
        from mmkernels.triton.siglip import _softplus
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, _softplus(tl.load(u_ptr + offs)))

    u = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([-1e-8, 0.0, 1e-8, -17.0, -30.0, 88.0])])
    u = torch.cat([u, torch.zeros(8192 - u.numel())])
    out = torch.empty_like(u)
    softplus_kernel[(1,)](u, out, BLOCK=8192)
    want = torch.nn.functional.softplus(u.double())
    # Relative precision down to fp32's smallest normal number (below it, only subnormals' absolute)
    torch.testing.assert_close(out.double(), want, rtol=4e-7, atol=torch.finfo(torch.float32).tiny)
    naive = torch.log(1 + torch.exp(u))
    assert (naive[u < -17] == 0).all()  # what the kernel's formula avoids


@interpreter
def test_siglip_fp16_p_keeps_learnt_pairs(monkeypatch):
    """Learnt pairs (positives at x = +18, negatives at -82): every entry of P is
    ~1.5e-8 * g_row, below fp16's smallest subnormal. Scaled to P_BOUND = 2^15 it
    keeps fp16's precision; scaled only to |sigma * P| <= 1 (the logsumexp
    backward's choice) it flushes to zero and the gradients vanish."""
    q, _ = torch.linalg.qr(torch.randn(16, 12))
    a = q.T.contiguous().half()            # orthonormal rows
    b = a.clone()
    s, t = torch.tensor(100.0), torch.tensor(-82.0)
    g_row = torch.ones(12)
    want = siglip_op.bwd_reference(a.double(), b.double(), s.double(), t.double(), False, True,
                                   g_row.double())
    assert want[2].abs().max() < 1e-6

    def error():
        got = siglip_kernels.triton_siglip_bwd(a, b, s, t, False, True, g_row)
        return max(((x.double() - w).abs().max() / w.abs().max()).item() for x, w in zip(got, want))

    scaled = error()
    monkeypatch.setattr(siglip_kernels, "P_BOUND", 1.0)
    assert scaled < 2e-3 < error(), scaled


@interpreter
def test_siglip_deterministic_bitwise():
    """No atomics: two runs of siglip_loss forward + backward agree bit for bit."""
    a, b = torch.randn(45, 33), torch.randn(45, 33)
    results = []
    for _ in range(2):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        s, t = torch.tensor(7.0, requires_grad=True), torch.tensor(-4.0, requires_grad=True)
        loss = mmkernels.siglip_loss(x, y, s, t, normalize=True, backend="triton")
        loss.backward()
        results.append([loss.detach(), x.grad, y.grad, s.grad, t.grad])
    for first, second in zip(*results):
        assert torch.equal(first, second)


@interpreter
def test_siglip_autotuning_trials_leave_no_trace(autotuning_trials):
    """The forward's row partials and the backward's row sums of P are restored
    after each trial: a candidate with more column splits (forward) or narrower
    tiles (backward) than the winner writes slots the winner never overwrites.
    (20 x 71: the 32 x 32 winner splits the columns 3 ways, the 16 x 16 candidate 5.)"""
    assert _launch.forward_split(1, 3, 8)[1] < _launch.forward_split(2, 5, 8)[1]
    for positives in (True, False):
        _siglip_contract(20, 71, 20, positives, True)
    assert len(autotuning_trials) >= 6  # both candidates of the forward, P and products kernels


@interpreter
def test_siglip_opcheck_schema_autograd_and_fake_kernels():
    """opcheck's eager checks on the siglip ops (tracing them needs a GPU, below)."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    fwd, bwd = siglip_op.KERNELS["triton"]
    a = torch.randn(9, 5, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(7, 5, dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    t = torch.tensor(-1.0, requires_grad=True)
    for normalize, positives in ((False, True), (True, False)):
        torch.library.opcheck(fwd, (a, b, s, t, normalize, positives), test_utils=checks)
        torch.library.opcheck(bwd, (a.detach(), b.detach(), s.detach(), t.detach(), normalize, positives,
                                    torch.randn(9)), test_utils=checks)


@interpreter
def test_siglip_loss_picks_triton_kernels_under_the_interpreter():
    """backend="triton" and, with MMKERNELS_BACKEND=triton (the lane's), "auto" run
    the Triton kernels on CPU tensors; the result is open_clip's value."""
    from mmkernels.ops import siglip

    assert siglip.KERNELS.kernels("triton", torch.device("cpu")) == (siglip_kernels.triton_siglip_fwd,
                                                  siglip_kernels.triton_siglip_bwd)
    a, b = torch.randn(10, 6), torch.randn(10, 6)
    want = siglip_op.siglip_matrix_loss(a, b, torch.tensor(3.0), torch.tensor(-2.0), False, True).sum() / 10
    for backend in ("triton", "auto"):
        torch.testing.assert_close(mmkernels.siglip_loss(a, b, 3.0, -2.0, backend=backend), want)


# --- pure Python: configurations and grids -----------------------------------------

@pytest.mark.parametrize("arch", ["sm90", "sm80"])
@pytest.mark.parametrize("dclass", ["half", "tf32", "ieee", "fp64"])
@pytest.mark.parametrize("kind", ["tile", "mm"])
def test_configs_fit_the_architecture(arch, dclass, kind):
    configs = _launch.configs(kind, arch, dclass)
    assert configs
    limit = _launch.SHARED_MEMORY[arch] - _launch.EPILOGUE_HEADROOM
    assert all(_launch.shared_memory_bytes(kind, c, dclass) <= limit for c in configs)
    assert len({str(c) for c in configs}) == len(configs)


def test_deterministic_mode_keeps_to_the_first_candidate():
    """Timing-based choices could differ between processes (and with them the
    order of the sums): under torch.use_deterministic_algorithms(True) only the
    first candidate of each kernel runs."""
    kernel = lse_kernels._lse_fwd_kernel
    tuned = _launch._autotuner(kernel, "tile", "sm90", "half", ("N_KEY",), (), False)
    pinned = _launch._autotuner(kernel, "tile", "sm90", "half", ("N_KEY",), (), True)
    assert len(tuned.configs) > 1
    assert [str(c) for c in pinned.configs] == [str(tuned.configs[0])]
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert len(_launch.tuned(kernel, "tile", torch.device("cpu"), torch.float32, ("N_KEY",)).configs) == 1
    finally:
        torch.use_deterministic_algorithms(previous)


def test_interpreter_has_one_fixed_config():
    for kind in ("tile", "mm"):
        assert len(_launch.configs(kind, "interpreter", "half")) == 1


def test_configs_are_pruned_by_shared_memory(monkeypatch):
    monkeypatch.setitem(_launch.SHARED_MEMORY, "sm80", 60 * 1024)
    kept = _launch.configs("tile", "sm80", "half")
    every = _launch._CONFIGS["tile"][("sm80", "half")]
    assert 0 < len(kept) < len(every)


def test_dtype_classes_follow_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    try:
        for setting, expected in [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")]:
            torch.set_float32_matmul_precision(setting)
            assert _launch.dtype_class(torch.float32) == expected
        assert _launch.input_precision(torch.bfloat16) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert _launch.dtype_class(torch.bfloat16) == _launch.dtype_class(torch.float16) == "half"
    assert _launch.dtype_class(torch.float64) == "fp64"


@pytest.mark.parametrize("tiles_r,tiles_c,sms", [
    (512, 512, 132), (512, 8, 132), (8, 512, 132), (79, 79, 108), (1, 1, 132), (3, 5, 1), (1000, 3, 16)])
def test_forward_split_fills_the_gpu_evenly(tiles_r, tiles_c, sms):
    groups, splits = _launch.forward_split(tiles_r, tiles_c, sms)
    target = _launch.PROGRAMS_PER_SM * sms
    assert 1 <= groups <= min(tiles_r, _launch.MAX_ROW_GROUPS)
    assert 1 <= splits <= min(tiles_c, _launch.MAX_COL_SPLITS)
    assert groups * splits <= max(target, 1)
    # every program within one row block and one column block of the same work
    rows_each = [len(range(g, tiles_r, groups)) for g in range(groups)]
    cols_each = [len(range(h, tiles_c, splits)) for h in range(splits)]
    assert max(rows_each) - min(rows_each) <= 1 and max(cols_each) - min(cols_each) <= 1
    if tiles_r * tiles_c >= 4 * target:  # big problems use most of the GPU
        assert groups * splits >= target // 2


def test_p_block_fits_its_budget():
    for arch in ("sm90", "sm80"):
        for size in (2, 4, 8):
            rows, cols = _launch.p_block(10**6, 10**6, size, arch)
            assert rows * cols * size <= _launch.P_BLOCK_BYTES[arch]
    assert _launch.p_block(5, 3, 2, "sm90") == (5, 3)


def test_every_candidate_has_a_dot_k_every_supported_triton_compiles():
    """triton 3.6's tl.dot rejects K < 16 for every dtype (fp32 and fp64 included)."""
    for kind, table in _launch._CONFIGS.items():
        for (arch, dclass), candidates in table.items():
            for config in candidates:
                assert config.kwargs["BLOCK_K"] >= _launch.MIN_DOT_K, (kind, arch, dclass, config)


def test_buckets():
    assert [_launch.bucket(n) for n in (1, 7, 16, 17, 10**9)] == [1, 8, 16, 32, 1 << 16]


@compiler
def test_kernels_compile_for_hopper_without_spills():
    """Every kernel of the backend, as its launcher calls it, compiled by Triton for
    sm90 with its first autotune candidate (tests/triton_aot.py does all of them)."""
    import triton_aot

    try:
        results = triton_aot.check(["sm90"], [torch.bfloat16], out=open(os.devnull, "w"))
    except (AttributeError, TypeError, ImportError) as error:  # Triton internals moved
        pytest.skip(f"triton {triton.__version__}: AOT internals differ ({error})")
    names = {r[0] for r in results}
    assert {"_lse_fwd_kernel", "_lse_merge_kernel", "_lse_bwd_p_kernel", "_products_kernel",
            "_similarity_fwd_kernel", "_siglip_fwd_kernel", "_siglip_bwd_p_kernel"} <= names
    for name, arch, dtype, config, usage in results:
        assert "error" not in usage, (name, config, usage)
        assert usage.get("local", 0) == 0 and usage.get("stack", 0) == 0, (name, config, usage)


@compiler
def test_siglip_kernels_compile_for_ampere_without_spills():
    """The SigLIP kernels for sm80 too, on the exact-fp32 path (FMA units, operands in
    registers: the likeliest to spill), with and without positives and normalization."""
    import triton_aot

    only = {"_siglip_fwd_kernel", "_siglip_bwd_p_kernel"}
    try:
        results = triton_aot.check(["sm80"], [torch.float32], out=open(os.devnull, "w"), only=only)
    except (AttributeError, TypeError, ImportError) as error:  # Triton internals moved
        pytest.skip(f"triton {triton.__version__}: AOT internals differ ({error})")
    assert {r[0] for r in results} == only and len(results) == 4
    for name, arch, dtype, config, usage in results:
        assert "error" not in usage, (name, config, usage)
        assert usage.get("local", 0) == 0 and usage.get("stack", 0) == 0, (name, config, usage)


def test_auto_picks_the_triton_siglip_kernels_for_cuda_tensors(monkeypatch):
    """On CUDA tensors "auto" resolves to triton, whose siglip kernels are registered
    (pure Python: needs no GPU)."""
    import mmkernels.triton  # noqa: F401  (import mmkernels registers it only where it runs)
    from mmkernels import backends

    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    name = backends.select_backend("auto", torch.device("cuda"))
    assert name == "triton"
    assert siglip_op.KERNELS.kernels(name, torch.device("cuda")) == (
        siglip_kernels.triton_siglip_fwd, siglip_kernels.triton_siglip_bwd)


# --- GPU ----------------------------------------------------------------------------

def _cuda_inputs(n, m, d, dtype, normalize_scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen) * normalize_scale
    b = torch.randn(m, d, device="cuda", dtype=dtype, generator=gen) * normalize_scale
    return a, b


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
    a, b = _cuda_inputs(n, m, d, dtype)

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
    a, b = _cuda_inputs(2048, 2048, 256, torch.float32)
    a = a * torch.linspace(0.1, 3, 2048, device="cuda").unsqueeze(1)
    largest = (100 * a @ b.T).abs().max().item()
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
def test_cuda_opcheck_and_compile_fullgraph():
    from mmkernels.ops import logsumexp, similarity

    a, b = _cuda_inputs(300, 200, 96, torch.bfloat16)
    s = torch.tensor(3.0, device="cuda")
    fwd, bwd = logsumexp.KERNELS["triton"]
    for normalize in (False, True):
        torch.library.opcheck(fwd, (a, b, s, normalize))
        row, col = fwd(a, b, s, normalize)
        torch.library.opcheck(bwd, (a, b, s, normalize, row, col, torch.rand_like(row), torch.rand_like(col)))
    sfwd, sbwd = similarity.KERNELS["triton"]
    torch.library.opcheck(sfwd, (a, b, s))
    torch.library.opcheck(sbwd, (a, b, s, torch.randn(300, 200, device="cuda", dtype=torch.bfloat16)))

    torch._dynamo.reset()

    def loss_fn(x, y, t):
        loss = mmkernels.contrastive_loss(x, y, t, normalize=True, label_smoothing=0.1, backend="triton")
        return loss + mmkernels.normalized_similarity(x, y, t).float().mean()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        x, y = a[:200].clone().requires_grad_(), b.clone().requires_grad_()
        t = s.clone().requires_grad_()
        loss = fn(x, y, t)
        loss.backward()
        results.append([loss.detach(), x.grad, y.grad, t.grad])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-3)


@pytest.mark.cuda
def test_cuda_first_call_autotunes_without_corrupting_outputs():
    """Autotuning reruns launches; the backward's accumulating products restore their
    outputs, so the first (tuning) call and a later one agree."""
    a, b = _cuda_inputs(5000, 4500, 384, torch.bfloat16)    # several P blocks in each direction
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
    n, d = 32768, 256
    a, b = _cuda_inputs(n, n, d, torch.bfloat16)
    a.requires_grad_()
    b.requires_grad_()
    mmkernels.contrastive_loss(a[:1024], b[:1024], 10.0, backend="triton").backward()   # warm-up, autotune
    a.grad = b.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    mmkernels.contrastive_loss(a, b, 10.0, normalize=True, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = 2 * n * d * 2
    products = 2 * n * d * 4        # pb, pa in fp32 (kernel contract)
    allowance = grads + 2 * products + 64 * 2**20 + 512 * n
    assert extra < allowance, f"extra {extra / 2**20:.0f} MiB (S alone: {n * n * 2 / 2**20:.0f} MiB)"


# --- GPU: the SigLIP kernels ------------------------------------------------------------

_HALF_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _relative(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,m,d,positives,normalize", [
    (4096, 4096, 768, True, True), (3001, 5003, 520, False, True), (2500, 1800, 1000, True, False),
    (1, 257, 64, True, True)])
def test_cuda_siglip_kernels_match_fp64(dtype, n, m, d, positives, normalize):
    """The fwd/bwd ops at real sizes (several P blocks, rectangular, the diagonal
    crossing blocks or absent) against the materialized contract in fp64."""
    a, b = _cuda_inputs(n, m, d, dtype)
    if not normalize:
        a, b = a / d ** 0.5, b / d ** 0.5       # |x| ~ scale, as for normalized features
    fwd, bwd = siglip_op.KERNELS["triton"]
    s = torch.tensor(10.0, device="cuda")
    t = torch.tensor(-10.0, device="cuda")
    g_row = torch.rand(n, device="cuda") / n
    args64 = (a.double(), b.double(), s.double(), t.double(), normalize, positives)
    tol = _HALF_TOL[dtype]
    error = _relative(fwd(a, b, s, t, normalize, positives), siglip_op.fwd_reference(*args64))
    assert error < 1e-5, f"row losses: relative error {error:.3g}"   # fp32 logits of exact products
    got = bwd(a, b, s, t, normalize, positives, g_row)
    want = siglip_op.bwd_reference(*args64, g_row.double())
    for name, x, w in zip(("pb", "pa", "p_row"), got, want):
        error = _relative(x, w)
        assert error < (1e-5 if name == "p_row" else tol), f"{dtype} {n}x{m}x{d} {name}: {error:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_siglip_loss_matches_fp64(dtype):
    """siglip_loss (backend="triton") value and every gradient (features, scale, bias) vs fp64."""
    import siglip_reference

    a, b = _cuda_inputs(4096, 4096, 768, dtype)
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_(),
              torch.tensor(10.0, device="cuda", requires_grad=True),
              torch.tensor(-10.0, device="cuda", requires_grad=True)]
    loss = mmkernels.siglip_loss(*leaves, normalize=True, backend="triton")
    loss.backward()
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    want = siglip_reference.siglip(*leaves64, normalize=True)
    want.backward()
    tol = _HALF_TOL[dtype]
    assert _relative(loss, want) < 1e-5
    for name, x, w in zip(("a", "b", "scale", "bias"), leaves, leaves64):
        assert _relative(x.grad, w.grad) < tol, name


@pytest.mark.cuda
def test_cuda_siglip_large_logits_and_learnt_pairs():
    """On the GPU's exp/log/division: unnormalized features at scale 100, bias -10
    (|x| in the thousands), and learnt pairs whose losses and gradients (~1e-9)
    must keep fp32's relative precision, element by element."""
    a, b = _cuda_inputs(1000, 1200, 64, torch.float32)
    a = a * torch.linspace(0.1, 4, 1000, device="cuda").unsqueeze(1)
    fwd, bwd = siglip_op.KERNELS["triton"]
    s, t = torch.tensor(100.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    largest = (100 * a.double() @ b.double().T).abs().max().item()
    rtol = fp32_logit_rtol(largest)
    for positives in (True, False):
        args64 = (a.double(), b.double(), s.double(), t.double(), False, positives)
        want = siglip_op.fwd_reference(*args64)
        torch.testing.assert_close(fwd(a, b, s, t, False, positives).double(), want, rtol=rtol,
                                   atol=rtol * want.abs().max().item())

    q, _ = torch.linalg.qr(torch.randn(64, 48, device="cuda", dtype=torch.float64))
    a = q.T.contiguous().float()            # orthonormal rows: x = +20 on the diagonal, -80 elsewhere
    s, t = torch.tensor(100.0, device="cuda"), torch.tensor(-80.0, device="cuda")
    g_row = torch.ones(48, device="cuda")
    args64 = (a.double(), a.double(), s.double(), t.double(), False, True)
    want = siglip_op.fwd_reference(*args64)
    assert want.max() < 1e-8
    torch.testing.assert_close(fwd(a, a, s, t, False, True).double(), want, rtol=1e-4, atol=0)
    got = bwd(a, a, s, t, False, True, g_row)
    want = siglip_op.bwd_reference(*args64, g_row.double())
    for name, x, w in zip(("pb", "pa", "p_row"), got, want):
        torch.testing.assert_close(x.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item(), msg=name)


@pytest.mark.cuda
def test_cuda_siglip_opcheck_and_compile_fullgraph():
    fwd, bwd = siglip_op.KERNELS["triton"]
    a, b = _cuda_inputs(300, 200, 96, torch.bfloat16)
    s, t = torch.tensor(3.0, device="cuda"), torch.tensor(-2.0, device="cuda")
    for normalize, positives in ((False, True), (True, False)):
        torch.library.opcheck(fwd, (a, b, s, t, normalize, positives))
        torch.library.opcheck(bwd, (a, b, s, t, normalize, positives, torch.rand(300, device="cuda")))

    torch._dynamo.reset()

    def loss_fn(x, y, scale, bias):
        return mmkernels.siglip_loss(x, y, scale, bias, normalize=True, backend="triton")

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        leaves = [a[:200].clone().requires_grad_(), b.clone().requires_grad_(),
                  s.clone().requires_grad_(), t.clone().requires_grad_()]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [x.grad for x in leaves])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-3)


@pytest.mark.cuda
def test_cuda_siglip_first_call_autotunes_without_corrupting_outputs():
    """Autotuning reruns launches; the partials they add to are restored, so the
    first (tuning) call and a later one agree bit for bit."""
    a, b = _cuda_inputs(5000, 5000, 384, torch.bfloat16)    # several P blocks in each direction
    results = []
    for _ in range(2):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        bias = torch.tensor(-5.0, device="cuda", requires_grad=True)
        rows = mmkernels.siglip_loss(x, y, 10.0, bias, normalize=True, reduction="none", backend="triton")
        (rows * torch.linspace(0, 1, 5000, device="cuda")).sum().backward()
        results.append([rows, x.grad, y.grad, bias.grad])
    for first, second in zip(*results):
        torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_siglip_extra_memory_is_bounded():
    """Peak memory of fwd+bwd beyond inputs, grads and the contract's fp32 pb/pa:
    the P block and O(N) partials, never the N x N matrix."""
    n, d = 32768, 256
    a, b = _cuda_inputs(n, n, d, torch.bfloat16)
    a.requires_grad_()
    b.requires_grad_()
    mmkernels.siglip_loss(a[:1024], b[:1024], 10.0, -10.0, backend="triton").backward()  # warm-up, autotune
    a.grad = b.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    mmkernels.siglip_loss(a, b, 10.0, -10.0, normalize=True, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = 2 * n * d * 2
    products = 2 * n * d * 4        # pb, pa in fp32 (kernel contract)
    allowance = grads + 2 * products + 64 * 2**20 + 512 * n
    assert extra < allowance, f"extra {extra / 2**20:.0f} MiB (S alone: {n * n * 2 / 2**20:.0f} MiB)"


# --- supported Triton versions (mmkernels/backends.py) ------------------------------

@pytest.mark.parametrize("found, ok", [("3.6.0", True), ("3.7.1", True), ("3.8.0", True), ("3.9.0", True),
                                       ("3.5.1", False), ("3.4.0", False), ("3.10.0", False)])
def test_triton_version_range(monkeypatch, found, ok):
    from mmkernels import backends

    monkeypatch.setattr(backends.importlib.metadata, "version", lambda name: found)
    problem = backends._triton_version_problem()
    assert (problem is None) == ok
    if not ok:
        assert found in problem and backends.TRITON_SUPPORTED_TEXT in problem


def test_triton_outside_the_range_auto_warns_once_and_named_raises(monkeypatch):
    """Outside the range: "auto" on CUDA passes over triton with one warning naming the
    versions; asking for triton raises with the same reason (never a compile error later)."""
    import warnings

    from mmkernels import backends

    reason = "triton 3.4.0 is installed; mmkernels' Triton kernels support triton >=3.6.0,<3.10"
    monkeypatch.setattr(backends, "_TRITON_VERSION_PROBLEM", reason)
    monkeypatch.setattr(backends, "_warned_triton_version", False)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="3.4.0.*>=3.6.0,<3.10"):
        assert backends.select_backend("auto", cuda) != "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select_backend("auto", cuda) != "triton"  # once per process
    with pytest.raises(RuntimeError, match="3.4.0"):
        backends.select_backend("triton", cuda)
