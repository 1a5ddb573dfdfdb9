"""SigLIP's compiled kernels (compiled_siglip_fwd / compiled_siglip_bwd of mmkernels._C):
what tests/test_siglip.py, which runs the cpu backend through the public API
and the kernel contract at its 8 x 16 tiles, cannot see.

CPU: other tile shapes against the contract, every instruction set against the
portable kernels, the vectorized softplus and sigmoid over a dense sweep of
logits, fp64 gradcheck of the ops on rectangular blocks, opcheck,
non-finite input, errors, and peak memory flat in N (a subprocess). CUDA: the
same contract on the GPU kernels (marked cuda; they skip without a GPU).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mmkernels
from loss_cases import largest_logit, spread_rows
from mmkernels import _extension
from mmkernels.ops import siglip
from test_cpp import cpu_tiles, cuda_bands  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not _extension.cpu_built(),
                                reason=f"extension not built: {_extension.why_unavailable()}")
TESTS = Path(__file__).resolve().parent


def _ops():
    from mmkernels import compiled

    return compiled.siglip_fwd, compiled.siglip_bwd


def _check_contract(a, b, scale, bias, normalize, positives, g_row, rtol=2e-5, what=""):
    """Both ops against siglip.py's materialized contract, in fp64."""
    fwd, bwd = _ops()
    args64 = [t.double() for t in (a, b, scale, bias)]
    got = fwd(a, b, scale, bias, normalize, positives)
    want = siglip.fwd_reference(*args64, normalize, positives)
    assert got.dtype == scale.dtype and got.shape == want.shape, what
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * want.abs().max().item(),
                               msg=f"{what} row loss")
    got = bwd(a, b, scale, bias, normalize, positives, g_row)
    want = siglip.bwd_reference(*args64, normalize, positives, g_row.double())
    for name, g, w in zip(("pb", "pa", "p_row"), got, want):
        assert g.dtype == scale.dtype and g.shape == w.shape, f"{what} {name}"
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=rtol * w.abs().max().item() + 1e-7,
                                   msg=f"{what} {name}")


# --- CPU: tiles, instruction sets, accuracy ------------------------------------------

@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 5), (7, 24), (256, 512)])
@pytest.mark.parametrize("n,m", [(1, 1), (13, 40), (40, 13)])
@pytest.mark.parametrize("positives", [True, False])
def test_tile_shapes(cpu_tiles, rows, cols, n, m, positives):  # noqa: F811
    """Tiles that cut the diagonal anywhere (a positive in a tile's first or last
    column, rows with none), N != M both ways."""
    cpu_tiles(rows, cols)
    a, b = torch.randn(n, 9) * 2, torch.randn(m, 9)
    _check_contract(a, b, torch.tensor(6.0), torch.tensor(-2.0), True, positives, torch.randn(n),
                    what=f"tiles {rows}x{cols} {n}x{m}")


@pytest.mark.parametrize("n,m,d", [(5, 3, 2), (17, 40, 9), (33, 95, 70)])
@pytest.mark.parametrize("positives", [True, False])
def test_every_isa_matches_generic(isa, cpu_tiles, n, m, d, positives):  # noqa: F811
    """Tiles of 8 x 24: vector bodies, masked tails of every width, positives in
    the body and in the tail of a row. Each ISA against the reference and
    against the portable kernels (the same sums in another order)."""
    fwd, bwd = _ops()
    cpu_tiles(8, 24)
    a, b = torch.randn(n, d), torch.randn(m, d)
    args = (a, b, torch.tensor(10.0), torch.tensor(-5.0), True, positives)
    g_row = torch.rand(n)
    _check_contract(*args, g_row, what=isa)
    got = [fwd(*args), *bwd(*args, g_row)]
    _extension._C.set_cpu_isa("generic")
    want = [fwd(*args), *bwd(*args, g_row)]
    for name, g, w in zip(("row", "pb", "pa", "p_row"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=f"{isa} {name}")


def test_every_isa_large_scale_unnormalized(isa, cpu_tiles):  # noqa: F811
    """Logits in the thousands both ways (no overflow, no cancellation) and
    learnt positives whose gradient is tiny but must not vanish."""
    cpu_tiles(5, 16)
    a, b = spread_rows(23, 37, 12, row_scales=(0.05, 4), b_scale=3)
    a[:12] = b[:12] * 0.5  # positives pushed far above the negatives
    _check_contract(a, b, torch.tensor(100.0), torch.tensor(-10.0), False, True, torch.rand(23),
                    rtol=2e-5 + 4 * largest_logit(a, b) * 2.0 ** -24, what=f"{isa} scale 100")


def _ulp_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| in fp32 ulps of the fp64 value want (the spacing of the
    floats in its binade; below the normal range, the smallest subnormal)."""
    _, exponent = torch.frexp(want)  # |want| = mantissa * 2^exponent, mantissa in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(want), (exponent - 24).clamp_min(-149))
    return ((got.double() - want) / ulp).abs().max().item()


def _logits_sweep() -> torch.Tensor:
    """fp32 logits: every float in [-1, 1] from 1e-30 up in steps of 2^-8 of
    the octave, and a dense grid out to +-87 (where exp(-|x|) still has normal results)."""
    tiny = torch.logspace(-30, 0, 20000, dtype=torch.float64)
    grid = torch.linspace(0, 87, 40001, dtype=torch.float64)
    x = torch.cat([tiny, grid, torch.tensor([0.0], dtype=torch.float64)]).float()
    return torch.cat([x, -x])


def test_vectorized_softplus_and_sigmoid_accuracy(isa, cpu_tiles):  # noqa: F811
    """One logit per row (b = 1, scale 1, bias 0): the row loss is softplus(x) and
    p_row is sigmoid(x) themselves, checked against fp64 over a dense sweep.
    Measured: SIMD 2.1 ulp (softplus) and 2.3 (sigmoid), portable 1.4 and 1.9;
    fp32 log(1 + exp(x)) would be 1.7e7 ulp off for the tiny ones."""
    fwd, bwd = _ops()
    cpu_tiles(256, 1)
    x = _logits_sweep()
    a, b = x.unsqueeze(1), torch.ones(1, 1)
    scale, bias = torch.tensor(1.0), torch.tensor(0.0)
    x64 = x.double()
    softplus = fwd(a, b, scale, bias, False, False)
    assert _ulp_error(softplus, torch.logaddexp(x64, torch.zeros(()).double())) <= 3, isa
    _, _, sigmoid = bwd(a, b, scale, bias, False, False, torch.ones(len(x)))
    assert _ulp_error(sigmoid, torch.sigmoid(x64)) <= 3, isa


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_isa_non_finite_input(isa, cpu_tiles, value):  # noqa: F811
    """A non-finite feature spoils its own row's loss and gradient, nothing else."""
    fwd, bwd = _ops()
    cpu_tiles(4, 16)
    a, b = torch.randn(9, 4), torch.randn(21, 4)
    a[3, 1] = value
    args = (a, b, torch.tensor(2.0), torch.tensor(-1.0), False, True)
    row = fwd(*args)
    others = torch.arange(9) != 3
    assert not torch.isfinite(row[3]) and torch.isfinite(row[others]).all(), isa
    pb, _, p_row = bwd(*args, torch.ones(9))
    assert torch.isfinite(p_row[others]).all() and torch.isfinite(pb[others]).all(), isa
    if value != value:  # NaN: P is NaN across row 3
        assert torch.isnan(p_row[3]), isa


# --- CPU: autograd, opcheck, errors -----------------------------------------------------

@pytest.mark.parametrize("n,m,positives", [(7, 4, True), (4, 7, True), (6, 5, False)])
def test_gradcheck_rectangular_blocks(cpu_tiles, n, m, positives):  # noqa: F811
    """fp64 gradients of the op itself (the autograd formula of siglip.py over the
    C++ backward) on the blocks the distributed ring feeds it."""
    fwd, _ = _ops()
    cpu_tiles(3, 2)
    leaves = [torch.randn(n, 5, dtype=torch.float64, requires_grad=True),
              torch.randn(m, 5, dtype=torch.float64, requires_grad=True),
              torch.tensor(1.5, dtype=torch.float64, requires_grad=True),
              torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)]
    for normalize in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, s, bias: fwd(a, b, s, bias, normalize, positives), leaves)


def test_opcheck_half_noncontiguous_more_columns():
    fwd, bwd = _ops()
    a = torch.randn(40, 9, dtype=torch.float16)[::4, 1:6].requires_grad_()   # (10, 5), strided
    b = torch.randn(5, 13, dtype=torch.float16).T.requires_grad_()           # (13, 5), transposed
    scale = torch.tensor(3.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    torch.library.opcheck(fwd, (a, b, scale, bias, True, True))
    torch.library.opcheck(bwd, (a.detach(), b.detach(), scale.detach(), bias.detach(), True, True,
                                torch.randn(10)))


def test_op_errors_name_the_argument():
    fwd, bwd = _ops()
    a, b, s = torch.randn(3, 4), torch.randn(5, 4), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="compiled_siglip_fwd: bias"):
        fwd(a, b, s, torch.zeros(2), False, True)
    with pytest.raises(RuntimeError, match="compiled_siglip_bwd: g_row"):
        bwd(a, b, s, torch.tensor(0.0), False, True, torch.zeros(5))
    with pytest.raises(RuntimeError, match="same D"):
        fwd(a, torch.randn(5, 3), s, torch.tensor(0.0), False, True)


def test_inference_mode():
    """The worker threads run with the caller's dispatch state."""
    a, b = torch.randn(40, 8), torch.randn(40, 8)
    with torch.inference_mode():
        got = mmkernels.siglip_loss(a, b, 3.0, -1.0, backend="cpu")
    want = mmkernels.siglip_loss(a.double(), b.double(), 3.0, -1.0, backend="naive")
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)


# --- CPU: memory --------------------------------------------------------------------------

_MEMORY_PROBE = """
    import json, sys, torch, mmkernels
    from memory_probe import reset_peak, rss_mib
    n, d = int(sys.argv[1]), int(sys.argv[2])

    def step(a, b):
        mmkernels.siglip_loss(a, b, 10.0, -10.0, normalize=True, backend="cpu").backward()

    step(*(torch.randn(64, d, requires_grad=True) for _ in range(2)))  # warm-up
    a, b = (torch.randn(n, d, requires_grad=True) for _ in range(2))
    base = rss_mib("VmRSS")
    reset_peak()
    step(a, b)
    grads_mib = 2 * a.numel() * a.element_size() / 2**20
    print(json.dumps({"extra_mib": rss_mib("VmHWM") - base - grads_mib}))
"""


def _extra_peak_mib(n: int, d: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_MEMORY_PROBE), str(n), str(d)], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_flat_in_n():
    """fwd + bwd at N = 12288 (S would be 576 MiB) adds O(N * D) beyond the
    inputs and their gradients: a few copies of the features (3 MiB each) and
    per-thread tiles, about what N = 1024 adds. (tests/test_siglip.py checks
    one size against the naive backend's matrix, which the probe does see.)"""
    small, large = _extra_peak_mib(1024, 64), _extra_peak_mib(12288, 64)
    assert large < 64, f"N = 12288 added {large:.0f} MiB of peak RSS (S alone is 576 MiB)"
    assert large - small < 32, f"peak RSS grew {large - small:.0f} MiB from N = 1024 to 12288"


# --- CUDA kernels (run where a GPU is present) ------------------------------------------

needs_cuda_ext = pytest.mark.skipif(not _extension.cuda_built(), reason="built without the CUDA kernels")


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (9, 4, 3), (63, 65, 17), (130, 70, 200), (70, 130, 40)])
@pytest.mark.parametrize("positives", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_contract(cuda_bands, n, m, d, positives, normalize):  # noqa: F811
    cuda_bands(64)
    a, b = torch.randn(n, d, device="cuda") * 2, torch.randn(m, d, device="cuda")
    scale, bias = torch.tensor(7.0, device="cuda"), torch.tensor(-3.0, device="cuda")
    _check_contract(a, b, scale, bias, normalize, positives, torch.randn(n, device="cuda"),
                    what=f"cuda {n}x{m}x{d}")


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_large_scale_unnormalized():
    a, b = spread_rows(80, 130, 12, row_scales=(0.05, 4), b_scale=3, device="cuda")
    a[:40] = b[:40] * 0.5
    _check_contract(a, b, torch.tensor(100.0, device="cuda"), torch.tensor(-10.0, device="cuda"), False, True,
                    torch.rand(80, device="cuda"), rtol=2e-5 + 4 * largest_logit(a, b) * 2.0 ** -24,
                    what="cuda scale 100")


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_loss_dtypes(cuda_bands, dtype, normalize):  # noqa: F811
    """The public loss on the cuda backend against the fp64 reference (tolerance table)."""
    from compare_to_reference import compare
    import siglip_reference as reference

    cuda_bands(64)
    a, b = torch.randn(150, 40, device="cuda"), torch.randn(150, 40, device="cuda")
    compare(lambda a, b, sb: mmkernels.siglip_loss(a, b, sb[0], sb[1], normalize=normalize, backend="cuda"),
            lambda a, b, sb: reference.siglip(a, b, sb[0], sb[1], normalize=normalize), [a, b], dtype,
            scale=torch.tensor([10.0, -5.0], device="cuda"), what=f"cuda {dtype}")


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_gradcheck_noncontiguous_opcheck():
    fwd, bwd = _ops()
    leaves = [torch.randn(9, 4, dtype=torch.float64, device="cuda", requires_grad=True),
              torch.randn(11, 4, dtype=torch.float64, device="cuda", requires_grad=True),
              torch.tensor(1.7, dtype=torch.float64, device="cuda", requires_grad=True),
              torch.tensor(-0.5, dtype=torch.float64, device="cuda", requires_grad=True)]
    for positives in (True, False):
        assert torch.autograd.gradcheck(lambda a, b, s, bias: fwd(a, b, s, bias, True, positives), leaves)
    x = torch.randn(40, 30, device="cuda")[::2, 5:25]
    y = torch.randn(20, 33, device="cuda").T
    _check_contract(x, y, torch.tensor(6.0, device="cuda"), torch.tensor(1.0, device="cuda"), True, True,
                    torch.randn(20, device="cuda"), what="cuda non-contiguous")
    a = torch.randn(70, 5, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(66, 5, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(2.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-1.0, device="cuda", requires_grad=True)
    torch.library.opcheck(fwd, (a, b, s, bias, True, True))
    torch.library.opcheck(bwd, (a.detach(), b.detach(), s.detach(), bias.detach(), True, True,
                                torch.rand(70, device="cuda")))


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_deterministic_and_current_stream():
    a, b = torch.randn(500, 64, device="cuda"), torch.randn(400, 64, device="cuda")
    args = (a, b, torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda"), False, True)
    fwd, bwd = _ops()
    want = [fwd(*args), *bwd(*args, torch.ones(500, device="cuda"))]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = [fwd(*args), *bwd(*args, torch.ones(500, device="cuda"))]
    torch.cuda.current_stream().wait_stream(side)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
