"""The Triton SigLIP kernels (mmkernels/triton/siglip.py): what the generic siglip
tests (tests/test_siglip.py, run on the triton backend in the interpreter lane) do
not reach.

- interpreter lane (tests/triton_fixtures.py): the kernel contract over P blocks of
  any size with the diagonal crossing them (or absent), D up to 4096, logits in the
  thousands, the softplus's relative precision, fp16 P on learnt pairs, bitwise
  determinism, autotuning trials, opcheck's eager checks, the backend's selection;
- the ahead-of-time compilation of the SigLIP kernels for sm80 (main process only);
- GPU (marked ``cuda``): the contract and the loss at real sizes, large logits and
  learnt pairs on the GPU's exp/log, autotuning safety, peak memory.
"""

import os

import pytest
import torch

import mmkernels
from loss_cases import largest_logit, spread_rows
from tolerances import fp32_logit_rtol
from triton_fixtures import (HAS_TRITON, assert_fwd_bwd_memory_bounded, autotuning_trials,  # noqa: F401  (fixture)
                             compiler, cuda_inputs, interpreter, requires_triton)

pytestmark = requires_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    import mmkernels.triton  # noqa: F401  (registers the kernels)
    from mmkernels.ops import siglip as siglip_op
    from mmkernels.triton import _launch, siglip as siglip_kernels


# --- interpreter lane ----------------------------------------------------------------

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
    a, b = spread_rows(19, 27, 12, row_scales=(0.1, 4), b_scale=3)
    assert largest_logit(a, b) > 1000
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
def test_siglip_autotuning_trials_leave_no_trace(autotuning_trials):  # noqa: F811
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
    """opcheck's eager checks on the siglip ops (tracing them needs a GPU: tests/test_compile.py)."""
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


# --- backend selection and ahead-of-time compilation (no GPU needed) -------------------

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


# --- GPU ------------------------------------------------------------------------------

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
    a, b = cuda_inputs(n, m, d, dtype)
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

    a, b = cuda_inputs(4096, 4096, 768, dtype)
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
    a, b = cuda_inputs(1000, 1200, 64, torch.float32)
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
def test_cuda_siglip_first_call_autotunes_without_corrupting_outputs():
    """Autotuning reruns launches; the partials they add to are restored, so the
    first (tuning) call and a later one agree bit for bit."""
    a, b = cuda_inputs(5000, 5000, 384, torch.bfloat16)    # several P blocks in each direction
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
    assert_fwd_bwd_memory_bounded(
        lambda a, b, **options: mmkernels.siglip_loss(a, b, 10.0, -10.0, backend="triton", **options))
