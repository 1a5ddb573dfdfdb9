r"""Triton kernels of SigLIP's sigmoid loss: per-row sums of softplus over S, and its backward.

Maths
-----
``x[i, j] = scale * ra[i] * rb[j] * <a_i, b_j> + bias`` (ra, rb: inverse norms
when normalizing, else 1); ``z[i, j] = +1`` where the global row index equals
the global column index and ``positives_on_diagonal`` holds, -1 elsewhere.
The forward returns ``row[i] = sum_j softplus(-z[i, j] * x[i, j])``; the
backward, for an upstream ``g_row``, returns ``pb = P @ Bh``, ``pa = P.T @ Ah``
and ``p_row[i] = sum_j P[i, j]`` with
``P[i, j] = g_row[i] * (sigmoid(x[i, j]) - [z[i, j] = +1])``
(the kernel contract of mmkernels/ops/siglip.py, whose ``fwd_reference`` and
``bwd_reference`` are the references these kernels are tested against).
Normalization is fused as in the logsumexp kernels: ``scale * ra[i]`` and
``rb[j]`` are row and column factors of each tile's accumulator.

Numerics
--------
Per logit, in fp32 (fp64 for fp64 inputs), with ``v = -z * x`` (a select on
the diagonal, by comparing global indices; nothing else knows the positives):

- forward: ``softplus(v) = max(v, 0) + log1p(exp(-|v|))``, exact for any
  |v| (no overflow at logit_scale 100, no cancellation at bias -10). Triton
  has no log1p that also runs in its interpreter, so, with ``t = exp(-|v|)``
  and ``w = fl(1 + t)``: ``log1p(t) = log(w) + (t - (w - 1))`` up to a
  relative 2^-24 (``w - 1`` is exact, and ``t - (w - 1)`` is the rounding
  error of ``1 + t``, which ``log(w)`` missed). ``tl.log`` is libdevice's
  logf on NVIDIA GPUs (1 ulp, also near 1), so a learnt pair's loss, ~1e-9,
  keeps fp32's relative precision; ``log(1 + t)`` alone would round it to 0.
- backward: ``P = (-z * g_row) / (1 + exp(-v))``: for a positive this is
  ``-g_row * sigmoid(-x)``, never ``sigmoid(x) - 1`` (which is 0 once the pair
  is learnt). ``1 / (1 + exp(-v))`` keeps its relative precision for every v;
  ``exp(-v)`` overflows to inf only where the true value is below 1e-38, and
  then gives 0.

Forward: one pass over S, one exp and one log per logit
-------------------------------------------------------
The persistent grid of the logsumexp forward (mmkernels/triton/_launch.py:
``forward_split``): program (g, h) sweeps row blocks g, g + R, ... and, for
each, column blocks h, h + C, ..., computing each (BLOCK_M, BLOCK_N) tile of S
exactly once and adding its softplus values into the block's per-row sums, in
registers. There are no column statistics, so the only partials are the row
sums, (C, N) fp32 with C <= 32, each written by exactly one program and summed
over C in a fixed order afterwards: no atomics, deterministic.

Backward: S recomputed once, one exp per logit, P through L2
------------------------------------------------------------
The blocked scheme of the logsumexp backward (mmkernels/triton/logsumexp.py
says why): for each I x J block of S (sized to stay in L2), ``_siglip_bwd_p_kernel``
recomputes each tile once, writes P (input dtype for fp16/bf16, as the
logsumexp backward does; fp32/fp64 otherwise) and its tile's row sums of P,
in fp32 before any rounding; then ``matmul.products`` runs
``pb[I] (+)= P @ Bh[J]`` and ``pa[J] (+)= P.T @ Ah[I]`` in one launch.
fp16 P is stored times a power of two ``sigma`` (:func:`siglip_p_scale`) that puts
its bound, ``max |g_row|`` (a sigmoid is at most 1), at 2^15: no overflow
(fp16's largest is 65504; the products multiply in fp32), and 15 binades more
for the many small entries than the logsumexp backward's ``|sigma * P| <= 1``
leaves them (a softmax row holds an entry near its bound; SigLIP's negatives
sit at sigmoid(-10) ~ 5e-5 of it at initialization, and far lower once learnt,
where fp16 would flush them to zero). The products multiply by ``1/sigma``
and the row sums are taken before rounding: both undo it exactly.

The row sums of P go into (W, I) fp32 partials, W the tile columns of a block
(<= 64): each program writes its own slot, adding to it over the column
blocks of a row of blocks, which are then summed once in a fixed order: no
atomics, deterministic. As everywhere in the backend: fp32 inputs follow
``torch.get_float32_matmul_precision()``, any strides, int64 row offsets.

Cost (forward + backward, N x M x D): 4 GEMM-equivalents (8*N*M*D FLOPs),
the floor; per logit one exp and one log (forward), one exp and one division
(backward), plus O(1/BLOCK) per logit. Memory beyond the inputs: the
forward's (C, N) partials; the backward's contract outputs pb, pa (fp32), one
P block (<= 32 MiB) and (W, 4096) fp32 partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from mmkernels._checks import compute_dtype
from mmkernels.triton import _launch
from mmkernels.triton.matmul import products, row_block, row_factors, row_offsets, scaled_tile


# --- kernels ---------------------------------------------------------------------

@triton.jit
def _logits(a_ptr, b_ptr, rb_ptr, a_rows, b_rows, row_fac, cols, col_ok, bias, D,
            stride_ad, stride_bd, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
            ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile of x = S + bias. Outside the matrix the values are finite (rows are
    wrapped, not masked: matmul.row_offsets); callers mask what they keep."""
    return scaled_tile(a_ptr, b_ptr, rb_ptr, a_rows, b_rows, row_fac, cols, col_ok, D,
                       stride_ad, stride_bd, NORMALIZE, PRECISION, ACC,
                       BLOCK_M, BLOCK_N, BLOCK_K) + bias


@triton.jit
def _softplus(v):
    """log(1 + exp(v)) for any v, to fp32's relative precision (module docstring)."""
    t = tl.exp(-tl.abs(v))
    w = 1.0 + t
    return tl.maximum(v, 0.0) + (tl.log(w) + (t - (w - 1.0)))


@triton.jit
def _siglip_fwd_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr, bias_ptr, part_ptr,
    N, M, D,
    stride_an, stride_ad, stride_bm, stride_bd, stride_part,
    N_KEY, M_KEY, D_KEY,
    NORMALIZE: tl.constexpr, DIAGONAL: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (g, h): row blocks g, g+R, ... x column blocks h, h+C, ...;
    each row's sum of softplus over those columns -> part[h, row]."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    g = tl.program_id(0)
    h = tl.program_id(1)
    groups = tl.num_programs(0)
    splits = tl.num_programs(1)
    scale = tl.load(scale_ptr).to(ACC)
    bias = tl.load(bias_ptr).to(ACC)
    out_ptr = part_ptr + h.to(tl.int64) * stride_part

    for t in range(g, tl.cdiv(N, BLOCK_M), groups):
        rows, row_ok, a_rows, row_fac = row_block(t, N, stride_an, scale, ra_ptr, NORMALIZE, ACC, BLOCK_M)
        total = tl.zeros((BLOCK_M,), dtype=ACC)

        for u in range(h, tl.cdiv(M, BLOCK_N), splits):
            cols = u * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            x = _logits(a_ptr, b_ptr, rb_ptr, a_rows, row_offsets(cols, M, stride_bm), row_fac,
                        cols, col_ok, bias, D, stride_ad, stride_bd,
                        NORMALIZE, PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
            if DIAGONAL:  # the pair's loss is softplus(-z * x): flip the positives
                x = tl.where(rows[:, None] == cols[None, :], -x, x)
            total += tl.sum(tl.where(col_ok[None, :], _softplus(x), 0.0), axis=1)

        tl.store(out_ptr + rows, total, mask=row_ok)


@triton.jit
def _siglip_bwd_p_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr, bias_ptr, g_row_ptr, sigma_ptr, p_ptr, part_ptr,
    I, J, D, diagonal_offset, accumulate,
    stride_an, stride_ad, stride_bm, stride_bd, stride_p, stride_part,
    I_KEY, J_KEY, D_KEY,
    NORMALIZE: tl.constexpr, DIAGONAL: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of ``sigma * P`` for the block a[:I] x b[:J] (pointers already
    offset; block row r is global row r + diagonal_offset's column), and its
    row sums of P -> part[tile column, row] (added when ``accumulate``)."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0)
    tiles_j = tl.cdiv(J, BLOCK_N)
    tj = pid % tiles_j
    rows = (pid // tiles_j) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < I
    col_ok = cols < J
    # The epilogue's operands are requested before the K-loop (latency hidden).
    row_fac = row_factors(tl.load(scale_ptr).to(ACC), ra_ptr, rows, row_ok, NORMALIZE, ACC, BLOCK_M)
    sigma = tl.load(sigma_ptr).to(ACC)
    g_r = tl.load(g_row_ptr + rows, mask=row_ok, other=0.0).to(ACC) * sigma
    x = _logits(a_ptr, b_ptr, rb_ptr, row_offsets(rows, I, stride_an), row_offsets(cols, J, stride_bm),
                row_fac, cols, col_ok, tl.load(bias_ptr).to(ACC), D, stride_ad, stride_bd,
                NORMALIZE, PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    numerator = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC) + g_r[:, None]
    if DIAGONAL:
        # Positives: -g * sigmoid(-x), with v = -x; negatives: g * sigmoid(x).
        positive = (rows + diagonal_offset)[:, None] == cols[None, :]
        x = tl.where(positive, -x, x)
        numerator = tl.where(positive, -numerator, numerator)
    p = numerator / (1.0 + tl.exp(-x))
    p = tl.where(col_ok[None, :], p, 0.0)

    # Row sums of P from the fp32 values (sigma is a power of two: exact to undo).
    row_sum = tl.sum(p, axis=1) * (1.0 / sigma)
    sums_ptrs = part_ptr + tj.to(tl.int64) * stride_part + rows
    if accumulate != 0:
        row_sum += tl.load(sums_ptrs, mask=row_ok, other=0.0)
    tl.store(sums_ptrs, row_sum, mask=row_ok)

    p_ptrs = p_ptr + rows.to(tl.int64)[:, None] * stride_p + cols[None, :]
    tl.store(p_ptrs, p.to(p_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --- launchers -------------------------------------------------------------------

# fp16 P's largest magnitude after scaling (module docstring): far below 65504,
# so no entry can overflow, and as high as that allows.
P_BOUND = 2.0 ** 15


def siglip_p_scale(a_dtype: torch.dtype, g_row: torch.Tensor) -> torch.Tensor:
    """sigma with |sigma * P| <= P_BOUND for fp16 P (else 1), as a device scalar:
    |P[i, j]| <= |g_row[i]|, a sigmoid being at most 1."""
    return _launch.fp16_p_scale(a_dtype, g_row.abs().amax(), P_BOUND)


def _forward(a, b, scale, bias, normalize: bool, diagonal: bool) -> torch.Tensor:
    n, d = a.shape
    m = b.shape[0]
    dtype = compute_dtype(a.dtype)
    ra, rb = _launch.inverse_norms(a, b, normalize, scale)
    # Autotuning runs every candidate: one with more column splits than the
    # winner would leave its extra rows of partials behind, so the partials are
    # restored to zero after each trial.
    kernel = _launch.tuned(_siglip_fwd_kernel, "tile", a.device, a.dtype, ("N_KEY", "M_KEY", "D_KEY"),
                           ("part_ptr",))
    split = _launch.forward_grid(n, m, a.device)
    # Rows of partials for the most column splits any candidate may pick; rows
    # the winner leaves unused stay 0.
    part = torch.zeros((max(split(c.kwargs)[1] for c in kernel.configs), n), device=a.device, dtype=dtype)
    _launch.launch(
        kernel, split,
        a, b, ra, rb, scale, bias, part, n, m, d,
        stride_part=part.stride(0), N_KEY=_launch.bucket(n), M_KEY=_launch.bucket(m), D_KEY=_launch.bucket(d),
        DIAGONAL=diagonal, **_launch.tile_args(a, b, normalize))
    return part.sum(0)


def _backward(a, b, scale, bias, normalize: bool, diagonal: bool, g_row):
    g_row = g_row.contiguous()  # read with unit stride
    n, d = a.shape
    m = b.shape[0]
    dtype = compute_dtype(a.dtype)
    p_dtype = a.dtype if a.dtype in (torch.float16, torch.bfloat16) else dtype
    ra, rb = _launch.inverse_norms(a, b, normalize, scale)
    sigma = siglip_p_scale(a.dtype, g_row)
    alpha = sigma.reciprocal()
    pb = torch.empty((n, d), device=a.device, dtype=dtype)
    pa = torch.empty((m, d), device=a.device, dtype=dtype)
    rows, cols = _launch.p_block(n, m, torch.empty((), dtype=p_dtype).element_size(),
                                 _launch.arch(a.device))
    p = torch.empty((rows, cols), device=a.device, dtype=p_dtype)
    # Autotuning (on the first block, which writes its row sums rather than adding
    # to them) runs every candidate: one with narrower tiles than the winner
    # writes slots the winner never will, so the partials are restored after each trial.
    kernel = _launch.tuned(_siglip_bwd_p_kernel, "tile", a.device, a.dtype, ("I_KEY", "J_KEY", "D_KEY"),
                           ("part_ptr",))
    # One slot per tile column of a block, for the narrowest candidate tile;
    # slots the winner leaves unused stay 0.
    part = torch.zeros((max(triton.cdiv(cols, c.kwargs["BLOCK_N"]) for c in kernel.configs), rows),
                       device=a.device, dtype=dtype)
    keys = dict(I_KEY=_launch.bucket(rows), J_KEY=_launch.bucket(cols), D_KEY=_launch.bucket(d))
    tile_args = _launch.tile_args(a, b, normalize)
    row_parts = _launch.blocks(n, rows, a, ra, g_row, pb)
    col_parts = _launch.blocks(m, cols, b, rb, pa)
    p_views = {}
    row_sums = []

    for i0, i1, (a_blk, ra_blk, g_row_blk, pb_blk) in row_parts:
        for j0, j1, (b_blk, rb_blk, pa_blk) in col_parts:
            shape = (i1 - i0, j1 - j0)
            if shape not in p_views:
                view = p[: shape[0], : shape[1]]
                p_views[shape] = (view, view.T)
            p_blk, p_blk_t = p_views[shape]
            _launch.launch(
                kernel, _launch.tile_grid(*shape),
                a_blk, b_blk, ra_blk, rb_blk, scale, bias, g_row_blk, sigma, p, part,
                shape[0], shape[1], d, i0 - j0, int(j0 > 0),
                stride_p=p.stride(0), stride_part=part.stride(0), DIAGONAL=diagonal, **keys, **tile_args)
            products((p_blk, b_blk, rb_blk if normalize else None, pb_blk, j0 > 0),
                     (p_blk_t, a_blk, ra_blk if normalize else None, pa_blk, i0 > 0),
                     alpha, key_shape=(rows, cols))
        # This row of blocks is complete: sum its slots, in a fixed order.
        row_sums.append(part[:, : i1 - i0].sum(0))
    return pb, pa, torch.cat(row_sums)


# --- registration ------------------------------------------------------------------

@triton_op("mmkernels::triton_siglip_fwd", mutates_args=())
def triton_siglip_fwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                      normalize: bool, positives_on_diagonal: bool) -> torch.Tensor:
    """Kernel contract ``fwd`` of mmkernels/ops/siglip.py on the Triton kernels."""
    return _forward(a, b, scale, bias, normalize, positives_on_diagonal)


@triton_op("mmkernels::triton_siglip_bwd", mutates_args=())
def triton_siglip_bwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                      normalize: bool, positives_on_diagonal: bool,
                      g_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel contract ``bwd`` of mmkernels/ops/siglip.py on the Triton kernels."""
    return _backward(a, b, scale, bias, normalize, positives_on_diagonal, g_row)
