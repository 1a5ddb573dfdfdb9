"""bf16 inputs on the C++ CPU kernels: every tile-product path this CPU runs
(``_C.cpu_bf16_products_supported()``: "mkl", MKL's bf16 x bf16 -> fp32 GEMM,
wherever torch carries it (AMX tiles on CPUs with AMX-BF16, where it is the
default); "avx512_bf16", our kernels of csrc/cpu/gemm_bf16.cpp, where the CPU
has AVX512-BF16; "fp32", the operands converted to fp32, always), against the fp64 references, for the
primitive, the masked primitive, the CLIP, InfoNCE and SigLIP losses; the
error of the backward's bf16 P; and the choice of the path (reported by
``mmkernels.compiled.cpu_kernel_paths``, forced by environment variables).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mmkernels
from loss_cases import CONTRASTIVE, INFO_NCE, LOGSUMEXP, SIGLIP, largest_logit, siglip_scalars, spread_rows
from mmkernels import _extension
from tolerances import HALF_FLOOR, assert_matches, relative_error

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not _extension.cpu_built(),
                                reason=f"extension not built: {_extension.why_unavailable()}")

PATHS = list(_extension._C.cpu_bf16_products_supported()) if _extension.cpu_built() else []
# (N, M, D): N = 1, D = 1, odd D and D not a multiple of 16 or 32, sizes across the 8 x 16 test tiles.
SHAPES = [(1, 1, 1), (1, 6, 3), (7, 9, 17), (16, 33, 31), (40, 23, 70)]


@pytest.fixture(params=PATHS)
def bf16_path(request):
    """Each bf16 tile-product path this CPU runs, restored after the test."""
    previous = _extension._C.cpu_bf16_products()
    _extension._C.set_cpu_bf16_products(request.param)
    yield request.param
    _extension._C.set_cpu_bf16_products(previous)


@pytest.fixture
def tiles_8x16():
    previous = _extension._C.set_cpu_tile_shape(8, 16)
    yield
    _extension._C.set_cpu_tile_shape(*previous)


def test_the_portable_path_is_always_there():
    assert PATHS[-1] == "fp32"
    assert _extension._C.cpu_bf16_products() in PATHS
    with pytest.raises(ValueError, match="'amx'"):
        _extension._C.set_cpu_bf16_products("amx")


@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_primitive(bf16_path, tiles_8x16, n, m, d, normalize):
    LOGSUMEXP.compare("cpu", [torch.randn(n, d), torch.randn(m, d)], torch.bfloat16,
                      scale=torch.tensor(7.0), what=f"{bf16_path} {n}x{m}x{d}", normalize=normalize)


@pytest.mark.parametrize("n,d", [(1, 1), (9, 17), (33, 31)])
def test_losses(bf16_path, tiles_8x16, n, d):
    what = f"{bf16_path} {n}x{d}"
    pair = [torch.randn(n, d), torch.randn(n, d)]
    CONTRASTIVE.compare("cpu", pair, torch.bfloat16, scale=torch.tensor(14.0), what=what, normalize=True)
    SIGLIP.compare("cpu", pair, torch.bfloat16, scale=siglip_scalars(10.0, -10.0), what=what, normalize=True)
    labels = torch.randint(0, 2 * n, (n,))
    INFO_NCE.compare("cpu", [torch.randn(n, d), torch.randn(2 * n, d)], torch.bfloat16,
                     scale=torch.tensor(20.0), what=what, labels=labels, normalize=True)


def test_scale_100_unnormalized(bf16_path, tiles_8x16):
    """Logits in the hundreds: the running maxima and SigLIP's softplus far from 0."""
    a, b = spread_rows(23, 23, 12, row_scales=(0.05, 1.5), b_scale=1.0)
    assert largest_logit(a, b) > 100
    CONTRASTIVE.compare("cpu", [a, b], torch.bfloat16, scale=torch.tensor(100.0), what=bf16_path)
    SIGLIP.compare("cpu", [a, b], torch.bfloat16, scale=siglip_scalars(100.0, -5.0), what=bf16_path)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(bf16_path, tiles_8x16, threads):
    """One thread, and more threads than cores (per-thread partials of pa merged)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        CONTRASTIVE.compare("cpu", [torch.randn(37, 20), torch.randn(37, 20)], torch.bfloat16,
                            scale=torch.tensor(10.0), what=f"{bf16_path} {threads} threads", normalize=True)
    finally:
        torch.set_num_threads(previous)


def test_masked_primitive(bf16_path, tiles_8x16):
    """Every exclusion rule at once, on bf16 features: the statistics as exact as
    the fp32 path's (the products are exact), the gradients to bf16 precision."""
    from test_masked_logsumexp import features, reference, rule_sets
    a, b = (x.bfloat16() for x in features(19, 24, 16, seed=6))
    scale = torch.tensor(6.0)
    rules = rule_sets(19, 24, a.float(), b.float(), scale)["all"]
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_(), scale.clone().requires_grad_()]
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    got = mmkernels.similarity_logsumexp(*leaves, backend="cpu", normalize=True, **rules)
    want = reference(*ref_leaves, normalize=True, **rules)
    weights = [torch.randn(t.shape, dtype=torch.float64) for t in want]
    for what, ours, ref in zip(("row_lse", "col_lse"), got, want):
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(ours), finite), f"{bf16_path} {what}: -inf entries differ"
        assert_matches(ours[finite], ref[finite].detach(), torch.float32, f"{bf16_path} {what}")
    totals = [sum((w * t.double()).masked_fill(~torch.isfinite(r), 0).sum() for w, t, r in zip(weights, ts, want))
              for ts in (got, want)]
    grads = torch.autograd.grad(totals[0], leaves)
    ref_grads = torch.autograd.grad(totals[1], ref_leaves)
    for what, g, r in zip(("grad a", "grad b", "grad scale"), grads, ref_grads):
        assert relative_error(g, r) <= HALF_FLOOR[torch.bfloat16], f"{bf16_path} {what}"


def test_p_rounding_error_and_exact_logits(bf16_path):
    """The compiled ops' fp32 outputs, before any rounding to the input dtype:
    row/column logsumexps as exact as fp32 products give (the bf16 operands
    multiply exactly), and pb = P @ B, pa = P^T @ A off the fp64 values by P's
    rounding to bf16 alone: each entry within 2^-8 (bf16's unit roundoff) of the
    sum of its terms' magnitudes, |P| @ |B|. docs/cpu-bf16.md quotes the measured
    errors (here: at most 3.1e-3 of that sum, 6e-4 on average)."""
    from mmkernels import compiled
    torch.manual_seed(3)
    n, m, d = 300, 520, 64  # several 256 x 512 tiles, partial ones at both edges
    a, b = torch.randn(n, d).bfloat16(), torch.randn(m, d).bfloat16()
    scale = torch.tensor(30.0)
    row, col = compiled.lse_fwd(a, b, scale, True)
    a64, b64 = (x.double() / x.double().norm(dim=1, keepdim=True) for x in (a, b))
    s = 30.0 * a64 @ b64.T
    assert relative_error(row, torch.logsumexp(s, 1)) < 1e-6
    assert relative_error(col, torch.logsumexp(s, 0)) < 1e-6
    g_row, g_col = torch.rand(n), torch.rand(m)
    pb, pa = compiled.lse_bwd(a, b, scale, True, row, col, g_row, g_col)
    p = g_row.double()[:, None] * torch.softmax(s, 1) + g_col.double()[None, :] * torch.softmax(s, 0)
    rounding = 1e-5 if bf16_path == "fp32" else 2.0 ** -8
    for what, got, want, magnitude in (("pb", pb, p @ b64, p @ b64.abs()), ("pa", pa, p.T @ a64, p.T @ a64.abs())):
        excess = (got.double() - want).abs() - rounding * magnitude
        assert excess.max() <= 1e-7, f"{bf16_path} {what}: off by more than P's rounding"


def _run(env_extra, code):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(ROOT))


REPORT = """
    import torch, mmkernels
    from mmkernels import compiled
    paths = compiled.cpu_kernel_paths()
    print(paths["bfloat16"]["products"], paths["float32"]["elementwise"])
    a = torch.randn(5, 4).bfloat16()
    print(float(mmkernels.contrastive_loss(a, a, 2.0, backend="cpu")))
"""


@pytest.mark.parametrize("path", PATHS)
def test_environment_forces_the_products(path):
    out = _run({"MMKERNELS_CPU_BF16_PRODUCTS": path}, REPORT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == path


def test_environment_forces_the_elementwise_isa():
    isa = _extension._C.cpu_isas()[-1]  # "generic": the portable kernels, on every CPU
    out = _run({"MMKERNELS_CPU_ISA": isa}, REPORT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == isa


@pytest.mark.parametrize("var,value", [("MMKERNELS_CPU_BF16_PRODUCTS", "amx"), ("MMKERNELS_CPU_ISA", "sse9")])
def test_a_bad_forced_path_is_an_error_naming_it(var, value):
    out = _run({var: value}, REPORT)
    assert out.returncode != 0
    assert f"{var}={value}" in out.stderr and "ValueError" in out.stderr


def test_kernel_paths_report_every_dtype():
    from mmkernels import compiled
    paths = compiled.cpu_kernel_paths()
    assert set(paths) == {"float64", "float32", "bfloat16", "float16"}
    assert paths["bfloat16"]["products"] == _extension._C.cpu_bf16_products()
    assert paths["float32"]["elementwise"] == compiled.cpu_isa()
    assert paths["float16"]["products"] == "fp32"  # fp16 -> bf16 would not be exact
