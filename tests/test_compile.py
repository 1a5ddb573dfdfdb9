"""torch.library registration and torch.compile, for every op on every backend: opcheck
on every kernel op, and torch.compile(fullgraph=True) through the public functions,
forward and backward.

- CPU, on the backends under test (conftest.py): opcheck of the primitive's, the
  similarity's and siglip's ops; aot_eager on each backend; inductor through "auto"
  and through the C++ siglip ops;
- GPU (marked ``cuda``): inductor on the cuda backend (the extension's CUDA kernels),
  opcheck and inductor on the triton backend.

Elsewhere, as they belong to a lane: the triton ops under the interpreter, which
torch.compile cannot trace (opcheck's eager checks and the error tracing raises:
tests/test_triton_*.py), and the extension's own opcheck cases (tests/test_cpp.py,
tests/test_cpp_siglip.py).
"""

import pytest
import torch

import mmkernels
import siglip_reference
from mmkernels import _extension
from mmkernels.ops import logsumexp, siglip, similarity
from triton_fixtures import cuda_inputs, requires_triton

needs_cpu_ext = pytest.mark.skipif(not _extension.cpu_built(),
                                   reason=f"extension not built: {_extension.why_unavailable()}")
needs_cuda_ext = pytest.mark.skipif(not _extension.cuda_built(), reason="built without the CUDA kernels")


# --- opcheck, every backend under test ----------------------------------------------

def _lse_args(dtype, normalize):
    a = torch.randn(9, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(7, 5, dtype=dtype, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         requires_grad=True)
    return a, b, scale, normalize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
def test_opcheck_primitive(backend, dtype, normalize):
    if backend == "naive":
        pytest.skip("naive is plain autograd, no custom op")
    fwd, bwd = logsumexp.KERNELS[backend]
    args = _lse_args(dtype, normalize)
    torch.library.opcheck(fwd, args)
    row, col = fwd(*args)
    a, b, scale, _ = args
    bwd_args = (a.detach(), b.detach(), scale.detach(), normalize, row.detach(), col.detach(),
                torch.rand_like(row), torch.rand_like(col))
    torch.library.opcheck(bwd, bwd_args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_similarity(dtype):
    for fwd, bwd in similarity.KERNELS.values():
        if "triton" in str(fwd):
            continue
        a = torch.randn(6, 4, dtype=dtype, requires_grad=True)
        b = torch.randn(5, 4, dtype=dtype, requires_grad=True)
        scale = torch.tensor(3.0, requires_grad=True)
        torch.library.opcheck(fwd, (a, b, scale))
        torch.library.opcheck(bwd, (a.detach(), b.detach(), scale.detach(), torch.randn(6, 5, dtype=dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("positives", [True, False])
def test_opcheck_siglip(backend, dtype, positives):
    if backend == "triton":
        pytest.skip("triton_op registration is checked on GPU (tests marked cuda)")
    if backend == "naive":
        pytest.skip("naive registers no kernels: its pair is the reference itself")
    fwd, bwd = siglip.KERNELS.kernels(backend, torch.device("cpu"))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.randn(9, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(7, 5, dtype=dtype, requires_grad=True)
    scale = torch.tensor(2.0, dtype=compute, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=compute, requires_grad=True)
    torch.library.opcheck(fwd, (a, b, scale, bias, True, positives))
    torch.library.opcheck(bwd, (a.detach(), b.detach(), scale.detach(), bias.detach(), False,
                                positives, torch.randn(9, dtype=compute)))


# --- torch.compile on CPU -----------------------------------------------------------

def _eager_and_compiled(fn, inputs, **compile_kwargs):
    """(loss, grads) of ``fn`` eagerly and through torch.compile(fullgraph=True):
    the forward is compiled, the backward runs through AOTAutograd's compiled graph."""
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, **compile_kwargs)):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        loss = f(*leaves)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    return results


def assert_compiled_matches(loss_fn, inputs, rtol=None, atol=None, **compile_kwargs):
    """The compiled loss and the gradients of every input equal the eager ones."""
    (want, want_grads), (got, got_grads) = _eager_and_compiled(loss_fn, inputs, **compile_kwargs)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def _compiled_backends(backend):
    # Seen with torch 2.13/triton 3.8: a triton_op runs eagerly on CPU tensors under the
    # interpreter, but torch.compile cannot trace it there (fake tensors have no data
    # pointer), so Triton's compile tests belong to the GPU lane (below).
    if backend == "triton":
        pytest.skip("compile of triton ops is checked on GPU (tests marked cuda)")


@pytest.mark.parametrize("normalize", [False, True])
def test_compile_fullgraph_contrastive(backend, normalize):
    _compiled_backends(backend)
    torch._dynamo.reset()

    def loss_fn(a, b, s):
        return mmkernels.contrastive_loss(a, b, s, normalize=normalize, label_smoothing=0.1,
                                          backend=backend)

    inputs = (torch.randn(13, 6), torch.randn(13, 6), torch.tensor(5.0))
    assert_compiled_matches(loss_fn, inputs, backend="aot_eager")


def test_compile_fullgraph_inductor_auto_backend_contrastive():
    """The default "auto" path, the selection function included, under inductor: contrastive_loss,
    info_nce, similarity_logsumexp and normalized_similarity."""
    torch._dynamo.reset()

    def loss_fn(a, b, s):
        loss = mmkernels.contrastive_loss(a, b, s) + mmkernels.info_nce(a, b, None, s).mul(0.5)
        loss = loss + mmkernels.similarity_logsumexp(a, b, s, normalize=True)[1].mean()
        return loss + mmkernels.normalized_similarity(a, b, s).mean()

    inputs = (torch.randn(10, 8), torch.randn(10, 8), torch.tensor(3.0))
    assert_compiled_matches(loss_fn, inputs, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_siglip(backend):
    _compiled_backends(backend)
    torch._dynamo.reset()

    def loss_fn(a, b, s, bias):
        return mmkernels.siglip_loss(a, b, s, bias, normalize=True, backend=backend)

    inputs = (torch.randn(13, 6), torch.randn(13, 6), torch.tensor(5.0), torch.tensor(-2.0))
    assert_compiled_matches(loss_fn, inputs, backend="aot_eager")


def test_compile_fullgraph_inductor_auto_backend_siglip():
    if mmkernels.backends.select_backend("auto", torch.device("cpu")) == "triton":
        pytest.skip("auto is triton in the interpreter lane, which torch.compile cannot trace "
                    "(compiled on GPU below)")
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, s, bias: mmkernels.siglip_loss(a, b, s, bias), fullgraph=True)
    a, b = torch.randn(10, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    s, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    fn(a, b, s, bias).backward()
    a64, b64, s64, bias64 = (t.detach().double().requires_grad_() for t in (a, b, s, bias))
    siglip_reference.siglip(a64, b64, s64, bias64).backward()
    for got, want in [(a.grad, a64.grad), (b.grad, b64.grad), (s.grad, s64.grad), (bias.grad, bias64.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)


@needs_cpu_ext
def test_compile_fullgraph_inductor_cpu_backend_siglip():
    """Inductor traces the C++ ops (fake kernels) and runs them: same loss and gradients."""
    torch._dynamo.reset()

    def loss_fn(a, b, s, bias):
        return mmkernels.siglip_loss(a, b, s, bias, normalize=True, backend="cpu")

    inputs = (torch.randn(21, 6), torch.randn(21, 6), torch.tensor(5.0), torch.tensor(-2.0))
    assert_compiled_matches(loss_fn, inputs)


# --- GPU: the cuda backend ----------------------------------------------------------

@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_compile_fullgraph_cuda_backend_contrastive():
    torch._dynamo.reset()

    def loss_fn(a, b, s):
        return mmkernels.contrastive_loss(a, b, s, normalize=True, label_smoothing=0.1, backend="cuda")

    inputs = [torch.randn(77, 16, device="cuda"), torch.randn(77, 16, device="cuda"),
              torch.tensor(5.0, device="cuda")]
    assert_compiled_matches(loss_fn, inputs, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_compile_fullgraph_cuda_backend_siglip():
    torch._dynamo.reset()

    def loss_fn(a, b, s, bias):
        return mmkernels.siglip_loss(a, b, s, bias, normalize=True, backend="cuda")

    inputs = [torch.randn(77, 16, device="cuda"), torch.randn(77, 16, device="cuda"),
              torch.tensor(5.0, device="cuda"), torch.tensor(-2.0, device="cuda")]
    assert_compiled_matches(loss_fn, inputs, rtol=1e-5, atol=1e-6)


# --- GPU: the triton backend --------------------------------------------------------

@pytest.mark.cuda
@requires_triton
def test_cuda_opcheck_and_compile_fullgraph_triton_primitive_and_similarity():
    import mmkernels.triton  # noqa: F401  (registers the kernels)

    a, b = cuda_inputs(300, 200, 96, torch.bfloat16)
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

    assert_compiled_matches(loss_fn, (a[:200], b, s), rtol=1e-2, atol=1e-3)


@pytest.mark.cuda
@requires_triton
def test_cuda_opcheck_and_compile_fullgraph_triton_siglip():
    import mmkernels.triton  # noqa: F401  (registers the kernels)

    fwd, bwd = siglip.KERNELS["triton"]
    a, b = cuda_inputs(300, 200, 96, torch.bfloat16)
    s, t = torch.tensor(3.0, device="cuda"), torch.tensor(-2.0, device="cuda")
    for normalize, positives in ((False, True), (True, False)):
        torch.library.opcheck(fwd, (a, b, s, t, normalize, positives))
        torch.library.opcheck(bwd, (a, b, s, t, normalize, positives, torch.rand(300, device="cuda")))

    torch._dynamo.reset()

    def loss_fn(x, y, scale, bias):
        return mmkernels.siglip_loss(x, y, scale, bias, normalize=True, backend="triton")

    assert_compiled_matches(loss_fn, (a[:200], b, s, t), rtol=1e-2, atol=1e-3)
