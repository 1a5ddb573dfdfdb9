"""siglip_loss and SigLipLoss against the fp64 reference and open_clip, on every backend
under test; the kernel contract of every backend against its materialized reference.
opcheck and torch.compile of the siglip ops: tests/test_compile.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmkernels
import siglip_reference as reference
from compare_to_reference import compare, gradcheck_fp64
from loss_cases import (HALF, SHAPES, SIGLIP, largest_logit, noncontiguous_pair, siglip_scalars, spread_rows,
                        square_pair)
from mmkernels.ops import siglip
from tolerances import fp32_logit_rtol


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_siglip_shapes(backend, small_tiles, shape, normalize):
    SIGLIP.compare(backend, square_pair(shape), torch.float32, scale=siglip_scalars(2.5, -1.5),
                   what=f"{backend} {shape}", normalize=normalize)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_siglip_reductions(backend, small_tiles, reduction):
    a, b = torch.randn(19, 12), torch.randn(19, 12)
    SIGLIP.compare(backend, [a, b], torch.float32, scale=siglip_scalars(10.0, -10.0),
                   what=f"{backend} {reduction}", normalize=True, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, *HALF])
@pytest.mark.parametrize("normalize", [False, True])
def test_siglip_dtypes(backend, small_tiles, dtype, normalize):
    a, b = torch.randn(21, 24), torch.randn(21, 24)
    SIGLIP.compare(backend, [a, b], dtype, scale=siglip_scalars(10.0, -5.0), what=f"{backend} {dtype}",
                   normalize=normalize)


def test_siglip_large_scale_unnormalized_negative_bias(backend, small_tiles):
    """Logits in the thousands both ways: softplus must neither overflow nor cancel."""
    a, b = spread_rows(24, 24, 16, row_scales=(0.1, 4), b_scale=3)
    largest = largest_logit(a, b)
    assert largest > 1000
    SIGLIP.compare(backend, [a, b], torch.float32, scale=siglip_scalars(100.0, -10.0),
                   what=f"{backend} scale 100 bias -10", rtol=fp32_logit_rtol(largest), reduction="none")


def test_siglip_learnt_pairs_keep_relative_precision(backend, small_tiles):
    """Positives at x = +20, negatives far below: every loss and gradient is tiny
    (~2e-9 per pair). They must keep fp32's relative precision; computing the
    positives as softplus(x) - x, or their gradient as sigmoid(x) - 1, gives 0."""
    q, _ = torch.linalg.qr(torch.randn(12, 8))
    a = q.T.contiguous()  # orthonormal rows: x = 100 - 80 on the diagonal, -80 elsewhere
    b = a.clone()
    scale, bias = torch.tensor(100.0, requires_grad=True), torch.tensor(-80.0, requires_grad=True)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    rows = mmkernels.siglip_loss(a_, b_, scale, bias, reduction="none", backend=backend)
    rows.sum().backward()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    s64, bias64 = (t.detach().double().requires_grad_() for t in (scale, bias))
    want = reference.siglip(a64, b64, s64, bias64, reduction="none")
    want.sum().backward()
    assert 1e-10 < want.min() and want.max() < 1e-8
    # Elementwise relative checks: the absolute tolerances of compare() would not see this.
    for got, ref, what in [(rows, want, "row losses"), (bias.grad, bias64.grad, "grad of bias"),
                           (scale.grad, s64.grad, "grad of scale"), (a_.grad, a64.grad, "grad of a"),
                           (b_.grad, b64.grad, "grad of b")]:
        torch.testing.assert_close(got.detach().double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                                   msg=f"{backend} {what}")


def test_siglip_noncontiguous(backend, small_tiles):
    SIGLIP.compare(backend, noncontiguous_pair(), torch.float32, scale=siglip_scalars(3.0, 0.5),
                   what=f"{backend} non-contiguous", normalize=True)


def test_siglip_number_scalars(backend):
    a, b = torch.randn(11, 5), torch.randn(11, 5)
    compare(lambda a, b, s: mmkernels.siglip_loss(a, b, 4.0, -2.0, backend=backend),
            lambda a, b, s: reference.siglip(a, b, 4.0, -2.0), [a, b], torch.float32,
            what=f"{backend} python-number scale and bias")


def test_siglip_defaults_are_scale_one_bias_zero(backend):
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    torch.testing.assert_close(mmkernels.siglip_loss(a, b, backend=backend),
                               reference.siglip(a, b, 1.0, 0.0))


def test_siglip_zero_scale_gradient(backend):
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    SIGLIP.compare(backend, [a, b], torch.float32, scale=siglip_scalars(0.0, 1.0),
                   what=f"{backend} zero scale")


def test_siglip_gradcheck(backend, small_tiles):
    gradcheck_fp64(lambda a, b, s, bias, normalize: mmkernels.siglip_loss(
        a, b, s, bias, normalize=normalize, reduction="none", backend=backend),
        10, 10, 6, 2.0, -1.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_siglip_nonfinite_input_gives_nonfinite_output(backend, value):
    a, b = torch.randn(9, 4), torch.randn(9, 4)
    a[3, 1] = value
    assert not torch.isfinite(mmkernels.siglip_loss(a, b, 2.0, -1.0, backend=backend))


# --- the kernel contract, op by op ------------------------------------------------

def _registered(backend):
    if backend == "naive":
        pytest.skip("naive registers no kernels: its pair is the reference itself")
    return siglip.KERNELS.kernels(backend, torch.device("cpu"))


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (9, 4, 3), (4, 9, 5), (17, 33, 7)])
@pytest.mark.parametrize("positives", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_kernel_contract(backend, small_tiles, n, m, d, positives, normalize):
    """fwd and bwd ops against the materialized contract: rectangular blocks, with and
    without positives on the diagonal (the distributed ring's remote blocks)."""
    fwd, bwd = _registered(backend)
    a, b = torch.randn(n, d) * 2, torch.randn(m, d)
    scale, bias = torch.tensor(7.0), torch.tensor(-3.0)
    g_row = torch.randn(n)
    got = fwd(a, b, scale, bias, normalize, positives)
    want = siglip.fwd_reference(a.double(), b.double(), scale.double(), bias.double(), normalize,
                                positives)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * want.abs().max().item())
    got = bwd(a, b, scale, bias, normalize, positives, g_row)
    want = siglip.bwd_reference(a.double(), b.double(), scale.double(), bias.double(), normalize,
                                positives, g_row.double())
    for name, g, w, shape in zip(("pb", "pa", "p_row"), got, want, [(n, d), (m, d), (n,)]):
        assert g.dtype == torch.float32 and g.shape == shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5 * w.abs().max().item() + 1e-7,
                                   msg=f"{backend} {name}")


# --- backend selection --------------------------------------------------------------

def test_backend_without_siglip_kernels(monkeypatch):
    """One policy for a backend with no kernels in an op's table, whether asked for by
    name or picked by "auto": an error naming the backend, the op and why; never
    another backend's kernels in its place."""
    monkeypatch.delitem(siglip.KERNELS._pairs, "torch")
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="backend 'torch' has no siglip_loss kernels"):
        mmkernels.siglip_loss(a, b, backend="torch")
    monkeypatch.setenv(siglip.backends.ENV_VAR, "torch")
    with pytest.raises(RuntimeError, match="'torch' has no siglip_loss kernels.*imported"):
        mmkernels.siglip_loss(a, b)
    with pytest.raises(RuntimeError, match="'newchip' has no siglip_loss kernels.*no such backend"):
        siglip.KERNELS.kernels("newchip", a.device)
    if "triton" not in siglip.KERNELS and not siglip.backends._triton_interpreting():
        with pytest.raises(RuntimeError, match="'triton'.*(TRITON_INTERPRET|not installed|triton)"):
            siglip.KERNELS.kernels("triton", a.device)


# --- SigLipLoss against open_clip ------------------------------------------------------

@pytest.fixture
def open_clip_loss():
    """open_clip's loss module; only these tests skip without it (a module-level skip
    here would skip every test of this file, as it did in a venv without open_clip)."""
    return pytest.importorskip("open_clip.loss")


def _run(loss_module, a, b, s, bias, **kw):
    a, b, s, bias = (x.detach().clone().requires_grad_() for x in (a, b, s, bias))
    loss = loss_module(a, b, s, bias, **kw)
    value = loss["contrastive_loss"] if isinstance(loss, dict) else loss
    value.backward()
    return value.detach(), a.grad, b.grad, s.grad, bias.grad


@pytest.mark.parametrize("n,d", [(1, 4), (17, 8), (64, 32)])
@pytest.mark.parametrize("output_dict", [False, True])
@pytest.mark.parametrize("normalized", [True, False])
def test_matches_open_clip(backend, n, d, output_dict, normalized, open_clip_loss):
    a, b = torch.randn(n, d), torch.randn(n, d)
    if normalized:
        a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    s, bias = torch.tensor(10.0), torch.tensor(-10.0)  # SigLIP's initial values
    theirs = _run(open_clip_loss.SigLipLoss(), a, b, s, bias, output_dict=output_dict)
    ours = _run(mmkernels.SigLipLoss(backend=backend), a, b, s, bias, output_dict=output_dict)
    for name, got, want in zip(("loss", "grad a", "grad b", "grad scale", "grad bias"), ours, theirs):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * want.abs().max().item(),
                                   msg=f"{backend} {name}")


def test_matches_open_clip_without_bias(backend, open_clip_loss):
    a, b, s = torch.randn(9, 5), torch.randn(9, 5), torch.tensor(3.0)
    torch.testing.assert_close(mmkernels.SigLipLoss(backend=backend)(a, b, s, None),
                               open_clip_loss.SigLipLoss()(a, b, s, None))


def test_siglip_module_settings_are_checked():
    with pytest.raises(ValueError, match="dist_impl.*'ring'"):
        mmkernels.SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        mmkernels.SigLipLoss(rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="world_size=2.*init_process_group"):
        mmkernels.SigLipLoss(rank=0, world_size=2)(torch.randn(3, 2), torch.randn(3, 2), 1.0, 0.0)


# --- input checks ----------------------------------------------------------------------

A, B = torch.randn(4, 3), torch.randn(4, 3)


@pytest.mark.parametrize("call,error,words", [
    (lambda: mmkernels.siglip_loss(A, torch.randn(5, 3)), ValueError, ["batch sizes differ", "(5, 3)"]),
    (lambda: mmkernels.siglip_loss(A, torch.randn(4, 2)), ValueError, ["feature dimensions differ"]),
    (lambda: mmkernels.siglip_loss(A.long(), B.long()), TypeError, ["image_features", "int64"]),
    (lambda: mmkernels.siglip_loss(A, B, 1.0, torch.ones(3)), ValueError, ["logit_bias", "(3,)"]),
    (lambda: mmkernels.siglip_loss(A, B, 1.0, "0"), TypeError, ["logit_bias", "str"]),
    (lambda: mmkernels.siglip_loss(A, B, torch.ones(2)), ValueError, ["logit_scale", "(2,)"]),
    (lambda: mmkernels.siglip_loss(A, B, reduction="avg"), ValueError, ["reduction", "'avg'"]),
    (lambda: mmkernels.siglip_loss(A, B, backend="fast"), ValueError, ["backend", "'fast'"]),
])
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


# --- memory ------------------------------------------------------------------------------

PROBE = """
import json, sys, torch, mmkernels
from memory_probe import rss_mib, reset_peak
backend, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def step(a, b):
    mmkernels.siglip_loss(a, b, torch.tensor(10.0), torch.tensor(-10.0), normalize=True,
                          backend=backend).backward()
step(*[torch.randn(64, d, requires_grad=True) for _ in range(2)])
a, b = (torch.randn(n, d, requires_grad=True) for _ in range(2))
base = rss_mib("VmRSS")
reset_peak()
step(a, b)
print(json.dumps({"extra_mib": rss_mib("VmHWM") - base - a.numel() * 8 / 2**20}))
"""


def _extra_peak_mib(backend, n, d):
    tests = Path(__file__).parent
    path = os.pathsep.join(filter(None, [str(tests.parent), str(tests), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", PROBE, backend, str(n), str(d)], capture_output=True,
                         text=True, timeout=300, check=True, env=dict(os.environ, PYTHONPATH=path))
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_is_o_n_d(backend):
    """Peak RSS of fwd+bwd in a fresh process: the matrix (256 MiB at N = 8192) must
    not appear for the tiled backends, and must for naive (the probe can fail)."""
    if backend == "triton":
        pytest.skip("Triton's memory is measured on GPU (benchmarks/bench_siglip.py)")
    extra = _extra_peak_mib(backend, 8192, 64)
    if backend == "naive":
        assert extra > 256, f"naive added only {extra:.0f} MiB: the probe is not measuring"
    else:
        assert extra < 64, f"{backend}: fwd+bwd added {extra:.0f} MiB of peak RSS (S is 256 MiB)"
