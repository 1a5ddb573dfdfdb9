"""The compiled extension mmkernels._C: build flags, the CPU kernels' own
machinery (every instruction set, tile shapes, threads, inference mode,
non-finite input), the import warning, and the CUDA kernels (marked cuda).

The generic reference tests (test_logsumexp.py, test_contrastive.py, ...)
already run the cpu backend whenever the extension is built; these tests
cover what they cannot see.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmkernels
import reference
from compare_to_reference import compare
from loss_cases import largest_logit, spread_rows
from mmkernels import _extension
from tolerances import fp32_logit_rtol

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("MMKERNELS_REQUIRE_EXT", "") not in ("", "0")

needs_cpu_ext = pytest.mark.skipif(not _extension.cpu_built(),
                                   reason=f"extension not built: {_extension.why_unavailable()}")


# --- build ------------------------------------------------------------------------

@pytest.mark.skipif(not REQUIRED, reason="MMKERNELS_REQUIRE_EXT is not set (the extension is optional)")
def test_required_extension_was_built():
    """Where the build is mandatory (CI), the CPU kernels must be there, and the
    CUDA ones wherever torch is a CUDA build and a toolkit was found."""
    assert _extension.cpu_built(), _extension.why_unavailable()
    assert "cpu" in mmkernels.available_backends("cpu")
    toolkit = os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"], "bin", "nvcc").exists()
    if torch.version.cuda and toolkit and os.environ.get("MMKERNELS_SKIP_CUDA", "") in ("", "0"):
        assert _extension.cuda_built(), "a CUDA toolkit is present but the CUDA kernels were not built"


@needs_cpu_ext
@pytest.mark.skipif(not _extension.cuda_built(), reason="built without the CUDA kernels")
def test_cuda_kernels_compiled_for_the_default_architectures():
    """The library holds device code for sm_80 and sm_90 (the default arch list)."""
    if os.environ.get("MMKERNELS_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("a non-default architecture list was asked for")
    data = Path(_extension._C.__file__).read_bytes()
    for arch in (b"sm_80", b"sm_90"):
        assert arch in data, f"no {arch.decode()} code in {_extension._C.__file__}"


def _import_mmkernels(env_extra, code):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    out = subprocess.run([sys.executable, "-W", "default", "-c", textwrap.dedent(code)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    return out


def test_missing_extension_warns_once_in_one_line():
    """Without mmkernels._C the import warns once, in one line, and the
    portable backends still run."""
    out = _import_mmkernels({}, """
        import sys, importlib.abc
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "mmkernels._C":
                    raise ImportError("hidden by the test")
        sys.meta_path.insert(0, Hide())
        import torch, mmkernels
        import mmkernels.ops.contrastive  # a second import: no second warning
        assert "cpu" not in mmkernels.available_backends("cpu")
        from mmkernels import backends
        assert "hidden by the test" in backends.why_unavailable("cpu", torch.device("cpu"))
        print(float(mmkernels.contrastive_loss(torch.randn(4, 3), torch.randn(4, 3))))
    """)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "ExtensionWarning" in lines[0], out.stderr
    assert "hidden by the test" in lines[0] and "MMKERNELS_NO_EXT" in lines[0]


def test_no_ext_variable_skips_the_extension_silently():
    out = _import_mmkernels({"MMKERNELS_NO_EXT": "1"}, """
        import torch, mmkernels
        from mmkernels import backends
        assert "cpu" not in mmkernels.available_backends("cpu")
        assert "MMKERNELS_NO_EXT" in backends.why_unavailable("cpu", torch.device("cpu"))
    """)
    assert "ExtensionWarning" not in out.stderr, out.stderr


# --- CPU kernels ----------------------------------------------------------------------

@pytest.fixture
def cpu_tiles():
    """A setter of the CPU kernels' tile shape (rows, cols), restored after the test."""
    previous = _extension._C.set_cpu_tile_shape(256, 512)
    yield _extension._C.set_cpu_tile_shape
    _extension._C.set_cpu_tile_shape(*previous)


def _lse(normalize):
    return (lambda a, b, s: mmkernels.similarity_logsumexp(a, b, s, normalize=normalize, backend="cpu"),
            lambda a, b, s: reference.logsumexp(a, b, s, normalize=normalize))


@needs_cpu_ext
def test_isas_listed_and_portable_one_present():
    isas = _extension._C.cpu_isas()
    assert isas[-1] == "generic" and _extension._C.cpu_isa() == isas[0]
    from mmkernels import compiled
    assert compiled.cpu_isa() == isas[0]
    with pytest.raises(ValueError, match="'sse9'"):
        _extension._C.set_cpu_isa("sse9")


@needs_cpu_ext
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (5, 3, 2), (17, 40, 9), (33, 95, 70)])
@pytest.mark.parametrize("normalize", [False, True])
def test_every_isa_matches_reference(isa, cpu_tiles, n, m, d, normalize):
    """Tiles of 8 x 24: vector bodies and masked tails of every width, several
    row tiles per thread, column statistics merged across threads."""
    cpu_tiles(8, 24)
    compare(*_lse(normalize), [torch.randn(n, d), torch.randn(m, d)], torch.float32,
            scale=torch.tensor(7.0), what=f"{isa} {n}x{m}x{d}")


@needs_cpu_ext
def test_every_isa_large_scale_unnormalized(isa, cpu_tiles):
    """Logits in the hundreds (running maxima rescaled many times), and rows whose
    mass sits in one tile far from the rest: exact to fp32 logit precision."""
    cpu_tiles(4, 16)
    a, b = spread_rows(23, 50, 12, row_scales=(0.05, 5), b_scale=2)
    compare(*_lse(False), [a, b], torch.float32, scale=torch.tensor(100.0),
            what=f"{isa} scale 100", rtol=fp32_logit_rtol(largest_logit(a, b)))


@needs_cpu_ext
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 5), (7, 16), (256, 512)])
def test_tile_shapes(cpu_tiles, rows, cols):
    cpu_tiles(rows, cols)
    compare(*_lse(True), [torch.randn(29, 11), torch.randn(37, 11)], torch.float32,
            scale=torch.tensor(20.0), what=f"tiles {rows}x{cols}")


@needs_cpu_ext
@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(cpu_tiles, threads):
    """One thread (no merges) and more threads than this machine's cores."""
    cpu_tiles(4, 8)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compare(*_lse(False), [torch.randn(31, 6), torch.randn(19, 6)], torch.float32,
                scale=torch.tensor(5.0), what=f"{threads} threads")
    finally:
        torch.set_num_threads(previous)


@needs_cpu_ext
def test_results_do_not_depend_on_tiles_beyond_rounding(cpu_tiles):
    a, b = torch.randn(300, 64), torch.randn(700, 64)
    cpu_tiles(256, 512)
    big = mmkernels.similarity_logsumexp(a, b, 30.0, normalize=True, backend="cpu")
    cpu_tiles(8, 24)
    small = mmkernels.similarity_logsumexp(a, b, 30.0, normalize=True, backend="cpu")
    for x, y in zip(big, small):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-5)


@needs_cpu_ext
def test_inference_mode_and_no_grad():
    """The worker threads run with the caller's dispatch state (inference tensors)."""
    a, b = torch.randn(40, 8), torch.randn(30, 8)
    want = reference.logsumexp(a.double(), b.double(), 2.0)
    with torch.inference_mode():
        got = mmkernels.similarity_logsumexp(a, b, 2.0, backend="cpu")
        loss = mmkernels.contrastive_loss(a[:30], b, 2.0, backend="cpu")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=1e-5)
    assert torch.isfinite(loss)


@needs_cpu_ext
def test_non_finite_inputs_give_non_finite_outputs():
    for name in _extension._C.cpu_isas():
        previous = _extension._C.cpu_isa()
        _extension._C.set_cpu_isa(name)
        try:
            a, b = torch.randn(9, 4), torch.randn(21, 4)
            a[3, 1] = float("nan")
            row, col = mmkernels.similarity_logsumexp(a, b, 2.0, backend="cpu")
            assert torch.isnan(row[3]) and torch.isnan(col).all(), name
            assert torch.isfinite(row[torch.arange(9) != 3]).all(), name
            a[3, 1] = float("-inf")  # S = +-inf in row 3
            row, col = mmkernels.similarity_logsumexp(a, b, 2.0, backend="cpu")
            assert not torch.isfinite(row[3]), name
        finally:
            _extension._C.set_cpu_isa(previous)


@needs_cpu_ext
def test_exp_accuracy_through_softmax_grad(cpu_tiles):
    """The backward's P sums to g_row + g_col per row/column (softmax rows sum
    to 1): a direct check of the vectorized exp over a wide range of logits."""
    cpu_tiles(16, 48)
    from mmkernels import compiled
    for name in _extension._C.cpu_isas():
        previous = _extension._C.cpu_isa()
        _extension._C.set_cpu_isa(name)
        try:
            a = torch.randn(50, 3) * 4
            b = torch.randn(70, 3) * 4
            scale = torch.tensor(3.0)
            row, col = compiled.lse_fwd(a, b, scale, False)
            s = (scale * a.double() @ b.double().T)
            torch.testing.assert_close(row.double(), torch.logsumexp(s, 1), rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(col.double(), torch.logsumexp(s, 0), rtol=1e-6, atol=1e-5)
            # pb with B = ones column: P @ 1 = row sums of P = g_row (+ g_col-weighted column softmax)
            ones_b = torch.cat([b, torch.ones(70, 1)], 1)
            ones_a = torch.cat([a, torch.zeros(50, 1)], 1)
            g_row, g_col = torch.rand(50), torch.zeros(70)
            pb, _ = compiled.lse_bwd(ones_a, ones_b, scale, False, row, col, g_row, g_col)
            # exact up to the fp32 rounding of the logits themselves (|S| in the hundreds)
            rtol = fp32_logit_rtol(s.abs().max().item())
            torch.testing.assert_close(pb[:, -1], g_row, rtol=rtol, atol=1e-6)
        finally:
            _extension._C.set_cpu_isa(previous)


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_noncontiguous_inputs(dtype):
    a = torch.randn(30, 20, dtype=dtype)[::2, 3:17]   # strided rows, offset columns
    b = torch.randn(14, 25, dtype=dtype).T             # transposed storage
    assert not a.is_contiguous() and not b.is_contiguous()
    compare(*_lse(True), [a, b], dtype, scale=torch.tensor(9.0), what=f"non-contiguous {dtype}")


@needs_cpu_ext
def test_similarity_runs_on_cpu_kernels(monkeypatch):
    """normalized_similarity with "auto" on CPU goes through the C++ op."""
    from mmkernels import compiled
    from mmkernels.ops import similarity

    calls = []
    fwd, bwd = similarity.KERNELS["cpu"]
    monkeypatch.setitem(similarity.KERNELS._pairs, "cpu",
                        (lambda *args: calls.append(1) or fwd(*args), bwd))
    monkeypatch.delenv("MMKERNELS_BACKEND", raising=False)
    a, b = torch.randn(70, 9, dtype=torch.bfloat16), torch.randn(600, 9, dtype=torch.bfloat16)
    out = mmkernels.normalized_similarity(a, b, 3.0)
    assert calls == [1] and out.dtype == torch.bfloat16
    want = 3.0 * F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)
    assert compiled.similarity_fwd is fwd


@needs_cpu_ext
def test_cpp_op_errors_name_the_argument():
    from mmkernels import compiled

    s = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="same D"):
        compiled.lse_fwd(torch.randn(3, 4), torch.randn(3, 5), s, False)
    with pytest.raises(RuntimeError, match="g_col"):
        compiled.lse_bwd(torch.randn(3, 4), torch.randn(5, 4), s, False, torch.zeros(3), torch.zeros(5),
                    torch.zeros(3), torch.zeros(4))


# --- CUDA kernels (run where a GPU is present) -----------------------------------------

needs_cuda_ext = pytest.mark.skipif(not _extension.cuda_built(), reason="built without the CUDA kernels")
CUDA_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture
def cuda_bands():
    """A setter of the CUDA kernels' rows per band (so small shapes span several
    bands), restored after the test."""
    previous = _extension._C.set_cuda_band_rows(0)
    yield _extension._C.set_cuda_band_rows
    _extension._C.set_cuda_band_rows(previous)


def _cuda_lse(normalize):
    return (lambda a, b, s: mmkernels.similarity_logsumexp(a, b, s, normalize=normalize, backend="cuda"),
            lambda a, b, s: reference.logsumexp(a, b, s, normalize=normalize))


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (1, 9, 2), (9, 1, 3), (63, 65, 17), (130, 70, 200)])
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_lse_shapes(cuda_bands, n, m, d, normalize):
    cuda_bands(64)
    compare(*_cuda_lse(normalize), [torch.randn(n, d, device="cuda"), torch.randn(m, d, device="cuda")],
            torch.float32, scale=torch.tensor(3.0, device="cuda"), what=f"cuda {n}x{m}x{d}")


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_lse_dtypes(cuda_bands, dtype, normalize):
    cuda_bands(64)
    a, b = torch.randn(150, 40, device="cuda"), torch.randn(97, 40, device="cuda")
    compare(*_cuda_lse(normalize), [a, b], dtype, scale=torch.tensor(20.0, device="cuda"),
            what=f"cuda {dtype} normalize={normalize}")


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_lse_large_scale_unnormalized():
    a, b = spread_rows(80, 130, 12, row_scales=(0.05, 5), b_scale=2, device="cuda")
    compare(*_cuda_lse(False), [a, b], torch.float32, scale=torch.tensor(100.0, device="cuda"),
            what="cuda scale 100", rtol=fp32_logit_rtol(largest_logit(a, b)))


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_gradcheck_and_noncontiguous():
    a = torch.randn(9, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(11, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    s = torch.tensor(1.7, dtype=torch.float64, device="cuda", requires_grad=True)
    for normalize in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, s: mmkernels.similarity_logsumexp(
            a, b, s, normalize=normalize, backend="cuda"), (a, b, s))
    x = torch.randn(40, 30, device="cuda")[::2, 5:25]
    y = torch.randn(20, 33, device="cuda").T
    compare(*_cuda_lse(True), [x, y], torch.float32, scale=torch.tensor(6.0, device="cuda"),
            what="cuda non-contiguous")


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_contrastive_matches_naive(dtype):
    a = torch.randn(300, 64, device="cuda").to(dtype)
    b = torch.randn(300, 64, device="cuda").to(dtype)
    compare(lambda a, b, s: mmkernels.contrastive_loss(a, b, s, normalize=True, backend="cuda"),
            lambda a, b, s: reference.contrastive(a, b, s, normalize=True), [a, b], dtype,
            scale=torch.tensor(14.0, device="cuda"), what=f"cuda contrastive {dtype}")


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_runs_on_the_current_stream():
    a, b = torch.randn(500, 64, device="cuda"), torch.randn(400, 64, device="cuda")
    want = mmkernels.similarity_logsumexp(a, b, 10.0, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = mmkernels.similarity_logsumexp(a, b, 10.0, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_normalized_similarity(dtype, monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "cuda")
    a = torch.randn(70, 33, device="cuda").to(dtype)
    b = torch.randn(130, 33, device="cuda").to(dtype)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    compare(lambda a, b, s: mmkernels.normalized_similarity(a, b, s).to(out_dtype),
            lambda a, b, s: s * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T,
            [a, b], dtype, scale=torch.tensor(2.5, device="cuda"), what=f"cuda similarity {dtype}")


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_opcheck(dtype):
    from mmkernels import compiled

    a = torch.randn(70, 5, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(66, 5, device="cuda", dtype=dtype, requires_grad=True)
    s = torch.tensor(2.0, device="cuda", requires_grad=True)
    for normalize in (False, True):
        torch.library.opcheck(compiled.lse_fwd, (a, b, s, normalize))
        row, col = compiled.lse_fwd(a, b, s, normalize)
        torch.library.opcheck(compiled.lse_bwd, (a.detach(), b.detach(), s.detach(), normalize, row.detach(),
                                            col.detach(), torch.rand_like(row), torch.rand_like(col)))
    torch.library.opcheck(compiled.similarity_fwd, (a, b, s))
    torch.library.opcheck(compiled.similarity_bwd, (a.detach(), b.detach(), s.detach(),
                                               torch.randn(70, 66, device="cuda", dtype=dtype)))
