"""normalized_similarity against the fp64 reference, on the backend "auto" picks."""

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from compare_to_reference import _grads
from tolerances import assert_matches


def _ref(a, b, s):
    return s * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 5, 3), (33, 17, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_normalized_similarity(n, m, d, dtype):
    a, b = torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)
    a, b = a.requires_grad_(), b.requires_grad_()
    s = torch.tensor(4.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     requires_grad=True)
    a64, b64, s64 = (x.detach().double().requires_grad_() for x in (a, b, s))
    a_same, b_same, s_same = (x.detach().clone().requires_grad_() for x in (a, b, s))

    out = mmkernels.normalized_similarity(a, b, s)
    ref = _ref(a64, b64, s64)
    same = _ref(a_same, b_same, s_same)
    assert out.dtype == dtype and out.shape == (n, m)
    assert_matches(out, ref, dtype, "value", same)
    weight = torch.randn(n, m, dtype=torch.float64)
    got = _grads([out], [weight], [a, b, s])
    want = _grads([ref], [weight], [a64, b64, s64])
    same_grads = _grads([same], [weight], [a_same, b_same, s_same])
    for name, g, w, x in zip(["a", "b", "scale"], got, want, same_grads):
        assert_matches(g, w, dtype, f"grad {name}", x)


def test_normalized_similarity_gradcheck():
    a = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mmkernels.normalized_similarity, (a, b, s))


def test_normalized_similarity_noncontiguous():
    a = torch.randn(12, 20)[::2, 1:15]   # (6, 14): strided rows, offset columns
    b = torch.randn(14, 9).T             # (9, 14): transposed storage
    assert not a.is_contiguous() and not b.is_contiguous()
    out = mmkernels.normalized_similarity(a, b, 3.0)
    torch.testing.assert_close(out, _ref(a, b, 3.0), rtol=1e-5, atol=1e-5)
