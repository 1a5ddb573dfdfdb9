"""torch.library registration: opcheck on every kernel op, and torch.compile(fullgraph=True)
through the public functions, forward and backward."""

import pytest
import torch

import mmkernels
from mmkernels.ops import logsumexp, similarity


def _compiled_backends(backend):
    # Seen with torch 2.13/triton 3.8: a triton_op runs eagerly on CPU tensors under the
    # interpreter, but torch.compile cannot trace it there (fake tensors have no data
    # pointer), so Triton's compile test belongs to the GPU lane (DESIGN.md section 5).
    if backend == "triton":
        pytest.skip("compile of triton ops is checked on GPU (tests marked cuda)")


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


@pytest.mark.parametrize("normalize", [False, True])
def test_compile_fullgraph_contrastive(backend, normalize):
    _compiled_backends(backend)
    torch._dynamo.reset()

    def loss_fn(a, b, s):
        return mmkernels.contrastive_loss(a, b, s, normalize=normalize, label_smoothing=0.1,
                                          backend=backend)

    inputs = (torch.randn(13, 6), torch.randn(13, 6), torch.tensor(5.0))
    (want, want_grads), (got, got_grads) = _eager_and_compiled(loss_fn, inputs, backend="aot_eager")
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_compile_fullgraph_inductor_auto_backend():
    """The default "auto" path, the selection function included, under inductor."""
    torch._dynamo.reset()

    def loss_fn(a, b, s):
        loss = mmkernels.contrastive_loss(a, b, s) + mmkernels.info_nce(a, b, None, s).mul(0.5)
        loss = loss + mmkernels.similarity_logsumexp(a, b, s, normalize=True)[1].mean()
        return loss + mmkernels.normalized_similarity(a, b, s).mean()

    inputs = (torch.randn(10, 8), torch.randn(10, 8), torch.tensor(3.0))
    (want, want_grads), (got, got_grads) = _eager_and_compiled(loss_fn, inputs)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
