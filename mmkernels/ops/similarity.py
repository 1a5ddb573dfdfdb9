r"""normalized_similarity: the cosine-similarity matrix, normalization fused.

Maths
-----
``S = scale * Ah @ Bh.T`` with ``Ah = a / max(||a||, eps)`` row-wise (likewise
Bh), i.e. ``S[i, j] = scale * ra[i] * rb[j] * <a_i, b_j>``: the normalization
is a rank-1 rescale of the plain matrix product, applied in its epilogue.

Backward, for an upstream ``G = dL/dS`` (N, M): the kernel returns
``pb = G @ Bh`` and ``pa = G.T @ Ah`` and the gradients follow as for the
primitive (mmkernels/ops/_common.py): ``dL/dAh = scale * pb``,
``dL/dscale = sum_i <Ah_i, pb_i>``, then the normalization backward.

Numerics
--------
Products accumulate in fp32 (fp64 for fp64 inputs); S is returned in the
input dtype (this op's job is to return S whole). The rows' scale factors are
applied in fp32 before the one rounding to the output dtype.

Kernel contract (what each backend registers in :data:`KERNELS`)
-----------------------------------------------------------------
``fwd(a, b, scale) -> S`` (input dtype) and ``bwd(a, b, scale, grad) -> (pb, pa)``
(compute dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmkernels import _checks, backends
from mmkernels.ops import _common
from mmkernels.ops._common import scaled_operand
from mmkernels.ops._registry import KernelTable


# --- autograd and fake kernels, shared by every backend ---------------------

def _fwd_fake(a: Tensor, b: Tensor, scale: Tensor):
    return a.new_empty(a.shape[0], b.shape[0])


def _bwd_fake(a: Tensor, b: Tensor, scale: Tensor, grad: Tensor):
    dtype = _checks.compute_dtype(a.dtype)
    return a.new_empty(a.shape, dtype=dtype), b.new_empty(b.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_through(bwd_op):
    def backward(ctx, grad):
        a, b, scale = ctx.saved_tensors
        pb, pa = bwd_op(a, b, scale, grad.contiguous())
        return _common.grads_from_products(a, b, scale, True, pb, pa, ctx.needs_input_grad)

    return backward


KERNELS = KernelTable("normalized_similarity", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                      setup_context=_setup_context, backward=_backward_through)


# --- torch backend -------------------------------------------------------------

@torch.library.custom_op("mmkernels::torch_similarity_fwd", mutates_args=())
def _torch_similarity_fwd(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    # Plain matmul in the compute dtype, then the rank-1 rescale of the epilogue.
    ra, rb = _common.inv_norms(a), _common.inv_norms(b)
    dtype = ra.dtype
    s = a.to(dtype) @ b.to(dtype).T
    s.mul_((scale * ra).unsqueeze(1)).mul_(rb)
    return s.to(a.dtype)


@torch.library.custom_op("mmkernels::torch_similarity_bwd", mutates_args=())
def _torch_similarity_bwd(a: Tensor, b: Tensor, scale: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    ah, bh = scaled_operand(a, True), scaled_operand(b, True)
    g = grad.to(ah.dtype)
    return g @ bh, g.T @ ah


# "naive" has nothing simpler to offer than this (the matrix is the output): the same pair.
KERNELS.register(("torch", "naive"), _torch_similarity_fwd, _torch_similarity_bwd)


# --- public function ------------------------------------------------------------

@_checks.outside_autocast
def normalized_similarity(a: Tensor, b: Tensor, logit_scale=1.0) -> Tensor:
    """``logit_scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T``, normalization fused.

    Args:
        a: (N, D) features; fp16, bf16, fp32 or fp64.
        b: (M, D) features of the same dtype and device.
        logit_scale: a number or a 0-dim tensor (which receives its gradient).

    Returns:
        The (N, M) matrix in the input dtype, differentiable w.r.t. a, b and
        logit_scale. Runs on the best backend for the device ("auto", or
        ``MMKERNELS_BACKEND``); "naive" and "torch" share the PyTorch version.
    """
    _checks.check_pair("a", a, "b", b, same_rows=False)
    name = backends.select_backend("auto", a.device)
    scale = _checks.as_scalar_tensor("logit_scale", logit_scale, a)
    fwd, _ = KERNELS.kernels(name, a.device)
    return fwd(a, b, scale)
