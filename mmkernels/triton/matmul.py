r"""Matrix-product building blocks shared by the Triton kernels.

Maths
-----
Two products appear in every kernel of this package:

- a tile of ``A @ B.T`` (``tile_dot``): rows ``i`` of a (N, D), rows ``j`` of
  b (M, D), with a K-loop over D. The forward statistics, the backward's P and
  normalized_similarity all start from it; normalization and scale are a
  rank-1 rescale applied by the caller afterwards.
- ``out[r, :] (+)= alpha * sum_k X[r, k] * s[k] * Y[k, :]`` (``products``):
  the backward's ``pb = P @ Bh`` and ``pa = P.T @ Ah``, with ``X = P`` (or its
  transpose, by strides), ``Y`` the raw features, and ``s`` their inverse row
  norms when normalizing (so ``s[k] * Y[k, :]`` is the normalized row, formed
  in the K-loop and never stored). Two such problems share one launch
  (``pid`` picks the problem), which fills the GPU with both halves of the
  backward at once.

Numerics
--------
Accumulation in fp32 (fp64 for fp64 inputs) whatever the input dtype; fp32
inputs multiply exactly (``input_precision="ieee"``) or in tf32, as
``torch.get_float32_matmul_precision()`` says (mmkernels/triton/_launch.py).
The normalized operand ``s[k] * Y[k, :]`` is rounded to the input dtype before
the tensor-core product, as F.normalize in that dtype would round it; its
entries are at most 1 in magnitude, so fp16 cannot overflow there.
All row offsets are int64 (``row * stride`` passes 2^31 at N*D > 2^31).
Rows past the end of a matrix are read from a valid row (``row % rows``)
rather than masked, so loads are masked along K only; their results are never
stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkernels.triton import _launch


# --- kernels ---------------------------------------------------------------------

# Triton's interpreter (3.8 at least; triton-lang/triton#11584) multiplies
# bf16 operands of tl.dot as their raw 16-bit patterns; upcasting them to fp32
# there is exact (bf16 products are exact in fp32), and the compiled GPU path
# never takes it. (No other bf16 arithmetic happens in these kernels: bf16
# values are only loaded, cast and stored.)
_INTERPRETING = tl.constexpr(_launch.INTERPRETING)


@triton.jit
def dot(x, y, acc, PRECISION: tl.constexpr):
    """``acc + x @ y`` (tl.dot), correct under the interpreter for bf16 too."""
    if _INTERPRETING and x.dtype == tl.bfloat16:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    # out_dtype: triton 3.6 defaults it to fp32 even for an fp64 accumulator
    # (and then rejects the mismatch); 3.8 infers it from acc.
    return tl.dot(x, y, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def row_offsets(rows, num_rows, stride):
    """int64 offsets of ``rows`` (wrapped into [0, num_rows): never out of bounds)."""
    return (rows % num_rows).to(tl.int64) * stride


@triton.jit
def tile_dot(a_ptr, b_ptr, a_rows, b_rows, D, stride_ad, stride_bd,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr, ACC: tl.constexpr):
    """``A[a_rows] @ B[b_rows].T`` as a (BLOCK_M, BLOCK_N) tile in ``ACC``; rows given as int64 offsets."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] + offs_k[None, :].to(tl.int64) * stride_ad
    b_ptrs = b_ptr + b_rows[None, :] + offs_k[:, None].to(tl.int64) * stride_bd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        k_left = D - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = dot(a, b, acc, PRECISION)
        a_ptrs += BLOCK_K * stride_ad
        b_ptrs += BLOCK_K * stride_bd
    return acc


@triton.jit
def row_factors(scale, ra_ptr, rows, row_ok, NORMALIZE: tl.constexpr, ACC: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """The row factors of a tile of S: ``scale * ra[rows]`` when normalizing, else ``scale``."""
    row_fac = tl.zeros((BLOCK_M,), dtype=ACC) + scale
    if NORMALIZE:
        row_fac = row_fac * tl.load(ra_ptr + rows, mask=row_ok, other=0.0)
    return row_fac


@triton.jit
def row_block(t, N, stride_an, scale, ra_ptr, NORMALIZE: tl.constexpr, ACC: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """Row block ``t`` of a: (rows, row_ok, their wrapped int64 offsets, their row
    factors), what a persistent forward sets up once for each of its row blocks."""
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    a_rows = row_offsets(rows, N, stride_an)
    return rows, row_ok, a_rows, row_factors(scale, ra_ptr, rows, row_ok, NORMALIZE, ACC, BLOCK_M)


@triton.jit
def scaled_tile(a_ptr, b_ptr, rb_ptr, a_rows, b_rows, row_fac, cols, col_ok, D,
                stride_ad, stride_bd, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
                ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile of S: ``A[a_rows] @ B[b_rows].T`` times the row factors ``row_fac``
    (scale, times ra when normalizing) and, when normalizing, the column factors
    rb[cols]. The primitive and SigLIP both start every tile here."""
    if NORMALIZE:  # requested before the K-loop: its latency hides behind the product
        col_fac = tl.load(rb_ptr + cols, mask=col_ok, other=0.0)
    s = tile_dot(a_ptr, b_ptr, a_rows, b_rows, D, stride_ad, stride_bd,
                 BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, ACC) * row_fac[:, None]
    if NORMALIZE:
        s = s * col_fac[None, :]
    return s


@triton.jit
def _products_tile(pid, x_ptr, y_ptr, s_ptr, out_ptr, alpha, rows, K, D, accumulate,
                   stride_xr, stride_xk, stride_yk, stride_yd, stride_or, stride_od,
                   KSCALE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_R, BLOCK_D) tile of ``out (+)= alpha * X @ (s * Y)``."""
    tiles_d = tl.cdiv(D, BLOCK_D)
    r = (pid // tiles_d) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = (pid % tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + row_offsets(r, rows, stride_xr)[:, None] + offs_k[None, :].to(tl.int64) * stride_xk
    y_ptrs = y_ptr + offs_k[:, None].to(tl.int64) * stride_yk + (d % D).to(tl.int64)[None, :] * stride_yd
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        y = tl.load(y_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if KSCALE:
            s = tl.load(s_ptr + k * BLOCK_K + offs_k, mask=offs_k < k_left, other=0.0)
            y = (y.to(ACC) * s[:, None]).to(y.dtype)
        acc = dot(x, y, acc, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        y_ptrs += BLOCK_K * stride_yk
    # Epilogue in two halves along D: loading the previous partial sum of the
    # whole tile beside the accumulator would double its registers (and spill
    # at 128 x 256 on sm90).
    halves = tl.split(tl.permute(tl.reshape(acc * alpha, (BLOCK_R, 2, BLOCK_D // 2)), (0, 2, 1)))
    out_rows = out_ptr + r.to(tl.int64)[:, None] * stride_or
    for half in tl.static_range(2):
        part = halves[half]
        d = (pid % tiles_d) * BLOCK_D + half * (BLOCK_D // 2) + tl.arange(0, BLOCK_D // 2)
        out_ptrs = out_rows + d.to(tl.int64)[None, :] * stride_od
        mask = (r[:, None] < rows) & (d[None, :] < D)
        if accumulate != 0:
            part += tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, part, mask=mask)


@triton.jit
def _products_kernel(
    x0_ptr, y0_ptr, s0_ptr, out0_ptr, rows0, k0, accumulate0,
    stride_x0r, stride_x0k, stride_y0k, stride_y0d, stride_o0r, stride_o0d,
    x1_ptr, y1_ptr, s1_ptr, out1_ptr, rows1, k1, accumulate1,
    stride_x1r, stride_x1k, stride_y1k, stride_y1d, stride_o1r, stride_o1d,
    D, alpha_ptr,
    ROWS_KEY, K_KEY, D_KEY,
    KSCALE: tl.constexpr, PRECISION: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Two problems ``out_p (+)= alpha * X_p @ (s_p * Y_p)`` in one grid: the
    first problem's tiles, then the second's (the launcher puts the longer K
    first: longest jobs first)."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0)
    tiles0 = tl.cdiv(rows0, BLOCK_R) * tl.cdiv(D, BLOCK_D)
    alpha = tl.load(alpha_ptr).to(ACC)
    if pid < tiles0:
        _products_tile(pid, x0_ptr, y0_ptr, s0_ptr, out0_ptr, alpha, rows0, k0, D, accumulate0,
                       stride_x0r, stride_x0k, stride_y0k, stride_y0d, stride_o0r, stride_o0d,
                       KSCALE, PRECISION, ACC, BLOCK_R, BLOCK_D, BLOCK_K)
    else:
        _products_tile(pid - tiles0, x1_ptr, y1_ptr, s1_ptr, out1_ptr, alpha, rows1, k1, D, accumulate1,
                       stride_x1r, stride_x1k, stride_y1k, stride_y1d, stride_o1r, stride_o1d,
                       KSCALE, PRECISION, ACC, BLOCK_R, BLOCK_D, BLOCK_K)


# --- launcher --------------------------------------------------------------------

def products(first, second, alpha: torch.Tensor, *, key_shape: tuple[int, int]) -> None:
    """Run ``out (+)= alpha * X @ (s * Y)`` for two problems in one launch (or for
    one: either may be None, for a side that needs no gradient).

    Each problem is ``(x, y, s, out, accumulate)``: x (R, K) in the features'
    dtype, any strides (a transpose is a stride swap); y (K, D) features;
    s (K,) inverse norms or None; out (R, D) in the compute dtype, written
    (``accumulate=False``) or added to. ``alpha``: a 0-dim compute-dtype
    tensor. ``key_shape``: the nominal (rows, K) of this family of launches,
    for the autotune key: every launch of one backward shares it, so only the
    first (which writes, not adds) is ever autotuned.
    """
    if first is None or second is None:
        # One problem: the grid covers its tiles only; the second problem's
        # arguments repeat the first's and are never read.
        first = first if first is not None else second
        second, rows1 = first, 0
    else:
        if second[0].shape[1] > first[0].shape[1]:
            first, second = second, first
        rows1 = second[0].shape[0]
    y0 = first[1]
    d = y0.shape[1]
    dtype = y0.dtype
    kscale = first[2] is not None
    kernel = _launch.tuned(_products_kernel, "mm", y0.device, dtype, ("ROWS_KEY", "K_KEY", "D_KEY"),
                           ("out0_ptr", "out1_ptr"))

    def args(problem):
        x, y, s, out, accumulate = problem
        return (x, y, s if s is not None else alpha, out, x.shape[0], x.shape[1], int(accumulate),
                x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1))

    rows0 = first[0].shape[0]

    def grid(meta):
        tiles_d = triton.cdiv(d, meta["BLOCK_D"])
        return ((triton.cdiv(rows0, meta["BLOCK_R"]) + triton.cdiv(rows1, meta["BLOCK_R"])) * tiles_d,)

    _launch.launch(
        kernel, grid,
        *args(first), *args(second), d, alpha,
        _launch.bucket(key_shape[0]), _launch.bucket(key_shape[1]), _launch.bucket(d),
        KSCALE=kscale, PRECISION=_launch.input_precision(dtype), IS_FP64=dtype == torch.float64)
