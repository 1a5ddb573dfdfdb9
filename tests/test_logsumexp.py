"""similarity_logsumexp (the primitive) against the fp64 reference, on every backend under test."""

import pytest
import torch

import mmkernels
import reference
from compare_to_reference import compare, gradcheck_fp64
from tolerances import fp32_logit_rtol


def _ours(backend, **kw):
    return lambda a, b, s: mmkernels.similarity_logsumexp(a, b, s, backend=backend, **kw)


def _ref(**kw):
    return lambda a, b, s: reference.logsumexp(a, b, s, **kw)


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (1, 9, 2), (9, 1, 3), (8, 16, 8), (15, 33, 7), (41, 17, 70)])
@pytest.mark.parametrize("normalize", [False, True])
def test_logsumexp_shapes(backend, small_tiles, n, m, d, normalize):
    a, b = torch.randn(n, d), torch.randn(m, d)
    compare(_ours(backend, normalize=normalize), _ref(normalize=normalize), [a, b],
            torch.float32, scale=torch.tensor(3.0), what=f"{backend} {n}x{m}x{d}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_logsumexp_dtypes(backend, small_tiles, dtype):
    a, b = torch.randn(19, 24), torch.randn(27, 24)
    compare(_ours(backend, normalize=True), _ref(normalize=True), [a, b], dtype,
            scale=torch.tensor(50.0), what=f"{backend} {dtype}")


def test_logsumexp_large_scale_unnormalized(backend, small_tiles):
    a = torch.randn(20, 12) * torch.linspace(0.05, 5, 20).unsqueeze(1)
    b = torch.randn(30, 12) * 2
    largest = (100 * a @ b.T).abs().max().item()
    compare(_ours(backend), _ref(), [a, b], torch.float32, scale=torch.tensor(100.0),
            what=f"{backend} scale 100", rtol=fp32_logit_rtol(largest))


def test_logsumexp_one_output_used(backend, small_tiles):
    """Backward through the row statistics alone (the column output unused) and vice versa."""
    a = torch.randn(12, 5, requires_grad=True)
    b = torch.randn(10, 5, requires_grad=True)
    a64, b64 = (x.detach().double().requires_grad_() for x in (a, b))
    for k in (0, 1):
        ours = mmkernels.similarity_logsumexp(a, b, 2.0, backend=backend)[k].sum()
        ref = reference.logsumexp(a64, b64, 2.0)[k].sum()
        got = torch.autograd.grad(ours, (a, b))
        want = torch.autograd.grad(ref, (a64, b64))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=1e-6)


def test_logsumexp_gradcheck(backend, small_tiles):
    gradcheck_fp64(lambda a, b, s, normalize: mmkernels.similarity_logsumexp(
        a, b, s, normalize=normalize, backend=backend), 9, 11, 4, 1.7)


def test_normalize_handles_zero_rows(backend, small_tiles):
    """A zero row normalizes to zero (F.normalize's eps), with F.normalize's gradient."""
    a, b = torch.randn(6, 4), torch.randn(7, 4)
    a[2] = 0
    compare(_ours(backend, normalize=True), _ref(normalize=True), [a, b], torch.float32,
            scale=torch.tensor(4.0), what=f"{backend} zero row")
