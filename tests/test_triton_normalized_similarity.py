"""The Triton kernels of normalized_similarity (mmkernels/triton/similarity.py): what
the generic tests (tests/test_normalized_similarity.py, run with "auto" = triton in
the interpreter lane) do not reach. Both run in the interpreter lane
(tests/triton_fixtures.py); on the GPU the ops are opcheck'ed and compiled with the
primitive's (tests/test_compile.py).
"""

import torch
import torch.nn.functional as F

import mmkernels
from triton_fixtures import HAS_TRITON, interpreter, requires_triton

pytestmark = requires_triton

if HAS_TRITON:
    import mmkernels.triton  # noqa: F401  (registers the kernels)


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
def test_similarity_opcheck_schema_autograd_and_fake_kernels():
    """opcheck's eager checks on the similarity ops (tracing them needs a GPU:
    tests/test_compile.py)."""
    from mmkernels.ops import similarity

    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    a = torch.randn(9, 5, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(7, 5, dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    sfwd, sbwd = similarity.KERNELS["triton"]
    torch.library.opcheck(sfwd, (a, b, s), test_utils=checks)
    torch.library.opcheck(sbwd, (a.detach(), b.detach(), s.detach(), torch.randn(9, 7, dtype=torch.bfloat16)),
                          test_utils=checks)
