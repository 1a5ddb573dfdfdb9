r"""Triton kernels of normalized_similarity: the matrix product with the normalization in its epilogue.

Maths
-----
``S = scale * Ah @ Bh.T`` with ``Ah = ra * a`` row-wise (ra: inverse norms,
F.normalize's eps), i.e. ``S[i, j] = (scale * ra[i]) * rb[j] * <a_i, b_j>``:
the plain product of the raw features, rescaled by a rank-1 factor in the
epilogue (mmkernels/ops/similarity.py states the contract; its
``similarity_reference`` is the reference). Backward, for ``G = dL/dS``:
``pb = G @ Bh`` and ``pa = G.T @ Ah``, the two products of
``matmul.products`` with the inverse norms applied to the rows of the raw
features inside its K-loop; one launch runs both.

Numerics
--------
Products accumulate in fp32 (fp64 for fp64 inputs; fp32 inputs follow
torch.get_float32_matmul_precision()); ``scale * ra[i] * rb[j]`` is applied
to the fp32 accumulator and S is rounded once, to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from mmkernels._checks import compute_dtype
from mmkernels.ops._common import inv_norms
from mmkernels.triton import _launch
from mmkernels.triton.matmul import products, row_offsets, tile_dot

# Row blocks per group of consecutive programs: they share one row panel of
# a and sweep the columns together, so both operands stay in L2.
GROUP_M = 8


@triton.jit
def _similarity_fwd_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr, s_ptr,
    N, M, D,
    stride_an, stride_ad, stride_bm, stride_bd, stride_sn, stride_sm,
    N_KEY, M_KEY, D_KEY,
    IS_FP64: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(N, BLOCK_M)
    tiles_n = tl.cdiv(M, BLOCK_N)
    # Grouped order: GROUP row blocks advance through the columns together.
    per_group = GROUP * tiles_n
    first = (pid // per_group) * GROUP
    group_rows = tl.minimum(tiles_m - first, GROUP)
    ti = first + (pid % per_group) % group_rows
    tj = (pid % per_group) // group_rows
    rows = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < M
    acc = tile_dot(a_ptr, b_ptr, row_offsets(rows, N, stride_an), row_offsets(cols, M, stride_bm), D,
                   stride_ad, stride_bd, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, ACC)
    ra = tl.load(ra_ptr + rows, mask=row_ok, other=0.0) * tl.load(scale_ptr).to(ACC)
    rb = tl.load(rb_ptr + cols, mask=col_ok, other=0.0)
    s = acc * ra[:, None] * rb[None, :]
    s_ptrs = s_ptr + rows.to(tl.int64)[:, None] * stride_sn + cols.to(tl.int64)[None, :] * stride_sm
    tl.store(s_ptrs, s.to(s_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, d = a.shape
    m = b.shape[0]
    out = torch.empty((n, m), device=a.device, dtype=a.dtype)
    kernel = _launch.tuned(_similarity_fwd_kernel, "tile", a.device, a.dtype, ("N_KEY", "M_KEY", "D_KEY"))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(m, meta["BLOCK_N"]),)

    _launch.launch(
        kernel, grid,
        a, b, inv_norms(a), inv_norms(b), scale, out, n, m, d,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        _launch.bucket(n), _launch.bucket(m), _launch.bucket(d),
        IS_FP64=a.dtype == torch.float64, PRECISION=_launch.input_precision(a.dtype), GROUP=GROUP_M)
    return out


def _backward(a, b, scale, grad):
    dtype = compute_dtype(a.dtype)
    grad = grad.to(a.dtype)
    pb = torch.empty(a.shape, device=a.device, dtype=dtype)
    pa = torch.empty(b.shape, device=a.device, dtype=dtype)
    one = torch.ones((), device=a.device, dtype=dtype)
    products((grad, b, inv_norms(b), pb, False), (grad.T, a, inv_norms(a), pa, False), one,
             key_shape=grad.shape)
    return pb, pa


@triton_op("mmkernels::triton_similarity_fwd", mutates_args=())
def triton_similarity_fwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Kernel contract ``fwd`` of mmkernels/ops/similarity.py on the Triton kernels."""
    return _forward(a, b, scale)


@triton_op("mmkernels::triton_similarity_bwd", mutates_args=())
def triton_similarity_bwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                          grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel contract ``bwd`` of mmkernels/ops/similarity.py on the Triton kernels."""
    return _backward(a, b, scale, grad)
