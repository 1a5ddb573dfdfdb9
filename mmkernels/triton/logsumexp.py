r"""Triton kernels of the primitive: row and column logsumexp of S, and its backward.

Maths
-----
``S[i, j] = scale * ra[i] * rb[j] * <a_i, b_j>`` (ra, rb: inverse norms when
normalizing, else 1); the forward returns ``row_lse = logsumexp(S, 1)`` and
``col_lse = logsumexp(S, 0)``; the backward returns ``pb = P @ Bh`` and
``pa = P.T @ Ah`` with
``P[i, j] = g_row[i] * exp(S[i, j] - row_lse[i]) + g_col[j] * exp(S[i, j] - col_lse[j])``
(the kernel contract of mmkernels/ops/logsumexp.py, whose ``lse_reference``
is the reference these kernels are tested against). Normalization is fused:
``scale * ra[i]`` and ``rb[j]`` are row and column factors applied to each
tile's fp32 accumulator, never a pass over S.

Forward: one pass over S, one exp per logit
-------------------------------------------
A persistent grid of R row groups x C column splits (mmkernels/triton/_launch.py:
``forward_split``). Program (g, h) sweeps its row blocks; for each, it sweeps
its column blocks, computing each (BLOCK_M, BLOCK_N) tile of S exactly once
(a K-loop over D), and takes both statistics from that tile:

- rows: the running (max, sum) of each row stays in registers (online
  logsumexp, fp32), and is written once per row block into the row partials
  (C, N);
- columns: the tile's column partials are merged into row g of the column
  partials (R, M) in global memory, a read-merge-write by the only program
  that ever touches row g, so neither locks nor atomics are needed.

A small kernel then merges the C row partials and the R column partials in a
fixed order. No buffer is O(N^2): the partials take (R * M + C * N) * 8 bytes
with R, C <= 32, whatever N. The whole forward is deterministic. (A spin lock
per column block, as in Triton's layer-norm tutorial, needs only M floats but
serializes programs that reach a column block together and merges in a
varying order; R <= 32 rows of partials cost little and keep the forward
reproducible.)

Exps per logit: the row statistics need ``E = exp(S - m_i)`` with ``m_i`` the
tile's row maximum. The column sums reuse it:
``sum_i exp(S[i, j] - T) = sum_i E[i, j] * w_i`` with ``w_i = exp(m_i - T)``
and T the tile's maximum: a multiply-add per logit instead of a second exp.
This keeps fp32's relative precision as long as every column's maximum in the
tile is within FAST_RANGE (40) of T, so that no term that matters underflows;
the kernel checks that per tile (a column-max reduction, no exp) and otherwise
takes the second exp, ``exp(S - column max)``, for that tile. Unnormalized
features at logit_scale 100 reach that fallback; CLIP's normalized embeddings
at logit_scale <= 100 rarely do. So: 1 exp per logit (2 in the tiles that
need it), plus O(1/BLOCK) per logit for the merges. The running maxima are
always online: nothing assumes |cos| <= 1.

Why ``tl.exp`` (``exp2(x * log2(e))`` on NVIDIA GPUs: one multiply and one
MUFU ex2) rather than exp2 with log2(e) folded into the scale: the backward
subtracts ``row_lse`` from the recomputed S, and where one logit dominates
(N = 1, or a confident positive pair) that difference is 0 exactly only when
both are in the same units; in base 2 it is off by ~|S| * 2^-24, which shows
as a relative error of that size in every gradient. The multiply costs one
FP32 instruction per logit beside ~8 others, on pipes that run 8 times the
MUFU's rate: a percent or two of the forward's epilogue, for exact zeros.

Backward: S recomputed once, 1 exp per logit, P through L2
----------------------------------------------------------
FlashAttention-2 keeps the (BLOCK_M, head_dim) accumulators of dQ in
registers; here head_dim is the feature dimension D = 512 to 4096, and a
(128, 768) fp32 accumulator does not fit in a register file. So the backward
works in blocks of S of I x J (4096 x 4096 bf16 on sm90: 32 MiB, sized to
stay in L2):

1. ``_lse_bwd_p_kernel`` recomputes each (BLOCK_M, BLOCK_N) tile of the block
   once and writes P for it (input dtype for fp16/bf16, as FlashAttention
   rounds P before its P @ V product and open_clip under autocast rounds dS
   before dS @ B; fp32/fp64 otherwise);
2. ``matmul.products`` runs ``pb[I] (+)= P @ Bh[J]`` and ``pa[J] (+)= P.T @ Ah[I]``
   in one launch, both reading the block back from L2.

Each tile of S is thus computed once and produces both dA and dB; FLOPs are
the floor (3 GEMM-equivalents: 6*N*M*D), and the traffic of P (write 2 bytes,
read 4 bytes per logit) is small next to its 4.6 kFLOP per logit at D = 768.
P uses one exp per logit: ``exp(S - c_j) = exp(S - r_i) * exp(r_i - t) * exp(t - c_j)``
with t the tile's largest row lse, safe when every ``t - c_j`` is within
FAST_RANGE (checked per tile, O(BLOCK) work), else two exps for that tile.
fp16 P is stored times a power of two ``sigma`` (|P * sigma| <= 1, from the
bound |P| <= max|g_row| + max|g_col|) so it neither overflows nor flushes to
zero early; the products multiply by 1/sigma. No atomics anywhere: pb and pa
are accumulated block after block by the programs that own their tiles, so
the backward is deterministic too. Under ``torch.use_deterministic_algorithms(True)``
the same kernels run with autotuning pinned to their first candidate
(mmkernels/triton/_launch.py: ``tuned``), so that results do not depend on
which config won a timing race in this process.

Memory: beyond the inputs, the contract's fp32 outputs pb, pa (N*D and M*D),
the P block (at most 32 MiB), inverse norms and partials (O(N) fp32).

The masked primitive: the same kernels, rules as constexpr flags
----------------------------------------------------------------
mmkernels/ops/masked_logsumexp.py's rules (diagonal, groups, row and column
thresholds, the positives' exemption) are four constexpr flags of the forward
and P kernels plus pointers to the rule vectors; with every flag off the
kernels compile to the unmasked primitive's code (the unmasked ops, and the
masked ops called without a rule, launch that specialization). With a rule
on, each tile loads the O(BLOCK) rule vectors of its rows and columns and
decides its mask with a compare per logit and rule; an excluded entry is
-inf in the tile, so it leaves the forward's max and sum and gets P = 0 in
the backward. Diagonal and groups exclude from both statistics, a row
(column) threshold from the row (column) statistic only: with a threshold
the two statistics keep different entries, so the forward takes a second
exp per logit for the columns and the backward its two-exp form (one exp
per term); without one the one-exp forms stay. A row or column with every
entry excluded gets lse = -inf: every shift of an exp is sanitized (0 for a
-inf maximum in the forward, +inf for a -inf lse in the backward, so its
terms are exp(-inf) = 0, never NaN). A frozen side (compute_pb or compute_pa
false) launches the products kernel on the other problem only: 3 N x M x D
products instead of 4. The masked forward keeps its first autotune
candidate (the others spill registers with the rule vectors beside the tile).

Ties: a threshold decides ``S[i, j] > threshold`` in the forward and again
in the backward on the recomputed S. Both compute S with the same
operations in the same order: the same K-loop (``tile_dot``), the same
factors, and, with a threshold on, candidates of one BLOCK_K for both
kernels (``_tile_kernel``). Under the interpreter no decision then flips
(measured: 0 of 512 rows with the threshold exactly at each row's largest
logit, also with other BLOCK_M x BLOCK_N in the backward; with BLOCK_K 16 in
the forward and 32 in the backward, 59 of 512 flip:
tests/test_triton_logsumexp.py ``tie_flips``). What remains on a GPU: the
forward's and the backward's tiles may differ in BLOCK_M x BLOCK_N and warps
(tensor-core instruction shapes), which is not known to change the order of
the sums over D but is not guaranteed either. Where a decision does flip,
the gradient of that one entry uses the other decision: its term of P is
added or dropped, an error bounded by that entry's probability
``exp(S[i, j] - lse)`` (times its upstream gradient); nothing else changes.
A threshold exactly at a logit is also decided against the kernel's S, not
against S as another library computes it: about 40% of such ties land the
other way than torch's fp32 product would say (its last bit differs).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op

from mmkernels._checks import compute_dtype
from mmkernels.ops import masked_logsumexp
from mmkernels.triton import _launch
from mmkernels.triton.matmul import products, row_block, row_factors, row_offsets, scaled_tile, tile_dot

# Largest spread between a tile's top statistic and any of its columns' for
# which the one-exp forms stay exact (module docstring). Tests set it to -1
# (always two exps) and to +inf (always one) to check both forms.
FAST_RANGE = 40.0


# --- kernels ---------------------------------------------------------------------

@triton.jit
def _scaled_tile(a_ptr, b_ptr, rb_ptr, a_rows, b_rows, row_fac, row_ok, cols, col_ok, D,
                 stride_ad, stride_bd, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile of S (row factor scale * ra, column factor rb), -inf outside the matrix."""
    s = scaled_tile(a_ptr, b_ptr, rb_ptr, a_rows, b_rows, row_fac, cols, col_ok, D,
                    stride_ad, stride_bd, NORMALIZE, PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    return tl.where(row_ok[:, None] & col_ok[None, :], s, float("-inf"))


# --- the rules of the masked primitive, per tile -------------------------------------

@triton.jit
def _rule_vectors(groups_ptr, threshold_ptr, index, ok, HAS_GROUPS: tl.constexpr,
                  HAS_THRESHOLD: tl.constexpr):
    """(groups, thresholds) of a tile's rows or columns: O(BLOCK) loads, only for the
    rules on (a rule that is off gets ``index`` as a placeholder, never read)."""
    groups = index
    threshold = index
    if HAS_GROUPS:
        groups = tl.load(groups_ptr + index, mask=ok, other=0)
    if HAS_THRESHOLD:
        threshold = tl.load(threshold_ptr + index, mask=ok, other=0.0)
    return groups, threshold


@triton.jit
def _excluded(s, rows, cols, positive, row_groups, col_groups, row_threshold, col_threshold,
              EXCLUDE_DIAGONAL: tl.constexpr, HAS_GROUPS: tl.constexpr,
              HAS_ROW_THRESHOLD: tl.constexpr, HAS_COL_THRESHOLD: tl.constexpr):
    """(s_row, s_col): the tile ``s`` with -inf where an entry leaves its row's
    (column's) logsumexp: a compare per logit for each rule on. The diagonal and
    the groups exclude from both, each threshold from its own statistic only, and
    the positive pair (i, positive[i]) is never excluded (positive -1: none)."""
    common = tl.zeros(s.shape, dtype=tl.int1)  # folded away by the first rule on
    if EXCLUDE_DIAGONAL:
        common = common | (rows[:, None] == cols[None, :])
    if HAS_GROUPS:
        common = common | (row_groups[:, None] == col_groups[None, :])
    out_of_row = common
    out_of_col = common
    if HAS_ROW_THRESHOLD:  # strictly above: a logit equal to its threshold stays
        out_of_row = out_of_row | (s > row_threshold[:, None])
    if HAS_COL_THRESHOLD:
        out_of_col = out_of_col | (s > col_threshold[None, :])
    other = cols[None, :] != positive[:, None]
    return (tl.where(out_of_row & other, float("-inf"), s),
            tl.where(out_of_col & other, float("-inf"), s))


@triton.jit
def _live(x, ok, MASKED: tl.constexpr):
    """Where a statistic ``x`` has entries: ``ok`` (inside the matrix) for the unmasked
    primitive; with rules on, a row or column may have every entry excluded (-inf)."""
    live = ok
    if MASKED:
        live = x > float("-inf")
    return live


@triton.jit
def _shift(x, ok, MASKED: tl.constexpr):
    """``x`` as the shift of an exp, 0 where it has no entries (so -inf - -inf never makes NaN)."""
    return tl.where(_live(x, ok, MASKED), x, 0.0)


@triton.jit
def _lse_fwd_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr, row_part_ptr, col_part_ptr,
    N, M, D,
    stride_an, stride_ad, stride_bm, stride_bd,
    stride_rp_stat, stride_rp_split, stride_cp_stat, stride_cp_group,
    N_KEY, M_KEY, D_KEY,
    NORMALIZE: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    positives_ptr=None, row_groups_ptr=None, col_groups_ptr=None,
    row_threshold_ptr=None, col_threshold_ptr=None,
    EXCLUDE_DIAGONAL: tl.constexpr = False, HAS_GROUPS: tl.constexpr = False,
    HAS_ROW_THRESHOLD: tl.constexpr = False, HAS_COL_THRESHOLD: tl.constexpr = False,
):
    """Program (g, h): row blocks g, g+R, ... x column blocks h, h+C, ...;
    row partials -> row_part[:, h], column partials -> col_part[:, g]
    (index 0: running max, 1: sum of exp relative to it). The rules (all off:
    the unmasked primitive) take excluded entries out of the tile as -inf."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    MASKED: tl.constexpr = EXCLUDE_DIAGONAL or HAS_GROUPS or HAS_ROW_THRESHOLD or HAS_COL_THRESHOLD
    # With a threshold the row and the column statistics keep different entries.
    SPLIT: tl.constexpr = HAS_ROW_THRESHOLD or HAS_COL_THRESHOLD
    g = tl.program_id(0)
    h = tl.program_id(1)
    groups = tl.num_programs(0)
    splits = tl.num_programs(1)
    scale = tl.load(scale_ptr).to(ACC)
    col_max_ptr = col_part_ptr + g.to(tl.int64) * stride_cp_group
    col_sum_ptr = col_max_ptr + stride_cp_stat
    row_max_ptr = row_part_ptr + h.to(tl.int64) * stride_rp_split
    row_sum_ptr = row_max_ptr + stride_rp_stat

    for t in range(g, tl.cdiv(N, BLOCK_M), groups):
        rows, row_ok, a_rows, row_fac = row_block(t, N, stride_an, scale, ra_ptr, NORMALIZE, ACC, BLOCK_M)
        if MASKED:
            positive = tl.load(positives_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
            row_groups, row_threshold = _rule_vectors(row_groups_ptr, row_threshold_ptr, rows, row_ok,
                                                      HAS_GROUPS, HAS_ROW_THRESHOLD)
        run_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
        run_sum = tl.zeros((BLOCK_M,), dtype=ACC)

        for u in range(h, tl.cdiv(M, BLOCK_N), splits):
            cols = u * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            b_rows = row_offsets(cols, M, stride_bm)
            s = _scaled_tile(a_ptr, b_ptr, rb_ptr, a_rows, b_rows, row_fac, row_ok, cols, col_ok, D,
                             stride_ad, stride_bd, NORMALIZE, PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
            s_col = s
            if MASKED:
                col_groups, col_threshold = _rule_vectors(col_groups_ptr, col_threshold_ptr, cols, col_ok,
                                                          HAS_GROUPS, HAS_COL_THRESHOLD)
                s, s_col = _excluded(s, rows, cols, positive, row_groups, col_groups, row_threshold,
                                     col_threshold, EXCLUDE_DIAGONAL, HAS_GROUPS, HAS_ROW_THRESHOLD,
                                     HAS_COL_THRESHOLD)

            # Rows: the tile's maxima, the one exp per logit, the online merge.
            tile_max = tl.max(s, axis=1)                          # -inf on padded rows
            e = tl.exp(s - _shift(tile_max, row_ok, MASKED)[:, None])
            new_max = tl.maximum(run_max, tile_max)
            safe_max = _shift(new_max, row_ok, MASKED)
            run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(e, axis=1) * tl.exp(tile_max - safe_max)
            run_max = new_max

            if SPLIT:
                # The columns' own entries: a second exp per logit (E is 0 where a
                # row threshold took an entry that the column keeps).
                part_max = tl.max(s_col, axis=0)
                part_sum = tl.sum(tl.exp(s_col - _shift(part_max, col_ok, MASKED)[None, :]), axis=0)
            else:
                # Columns: from the same tile, relative to its maximum `top` when every
                # column's maximum is within FAST of it (then E * w loses nothing).
                col_max = tl.max(s, axis=0)                       # -inf on padded columns
                top = tl.max(col_max, axis=0)
                lowest = tl.min(tl.where(_live(col_max, col_ok, MASKED), col_max, float("inf")), axis=0)
                if MASKED:  # every entry of the tile may be excluded
                    top = tl.where(top > float("-inf"), top, 0.0)
                if top - lowest <= FAST:
                    w = tl.exp(tile_max - top)                   # 0 on padded rows
                    part_sum = tl.sum(e * w[:, None], axis=0)
                    part_max = tl.zeros((BLOCK_N,), dtype=ACC) + top
                    if MASKED:  # a column without entries here must not raise its maximum
                        part_max = tl.where(col_max > float("-inf"), part_max, float("-inf"))
                else:
                    # Rare: recompute the tile rather than keep S live beside E in
                    # registers through the common path.
                    s = _scaled_tile(a_ptr, b_ptr, rb_ptr, a_rows, b_rows, row_fac, row_ok, cols, col_ok, D,
                                     stride_ad, stride_bd, NORMALIZE, PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
                    if MASKED:
                        s, s_col = _excluded(s, rows, cols, positive, row_groups, col_groups, row_threshold,
                                             col_threshold, EXCLUDE_DIAGONAL, HAS_GROUPS, HAS_ROW_THRESHOLD,
                                             HAS_COL_THRESHOLD)
                    part_sum = tl.sum(tl.exp(s - _shift(col_max, col_ok, MASKED)[None, :]), axis=0)
                    part_max = col_max

            # Merge into row g of the column partials, whose only writer this program
            # is. On its first row block there is nothing to merge with (so a rerun
            # of the kernel, as autotuning does, recomputes the same values).
            # (where, not `col_ok & (t != g)`: triton 3.9's interpreter turns a
            # tensor & scalar of booleans into int32, which it then refuses as a mask)
            seen = tl.where(t != g, col_ok, False)
            old_max = tl.load(col_max_ptr + cols, mask=seen, other=float("-inf"))
            old_sum = tl.load(col_sum_ptr + cols, mask=seen, other=0.0)
            merged = tl.maximum(old_max, part_max)
            safe = _shift(merged, col_ok, MASKED)
            tl.store(col_max_ptr + cols, merged, mask=col_ok)
            tl.store(col_sum_ptr + cols,
                     old_sum * tl.exp(old_max - safe) + part_sum * tl.exp(part_max - safe), mask=col_ok)

        tl.store(row_max_ptr + rows, run_max, mask=row_ok)
        tl.store(row_sum_ptr + rows, run_sum, mask=row_ok)


@triton.jit
def _lse_merge_kernel(part_ptr, out_ptr, parts, L, stride_stat, stride_part,
                      IS_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """``out[l] = log sum_p sum[p, l] * exp(max[p, l])``, merged in the order p = 0, 1, ..."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    top = tl.full((BLOCK,), float("-inf"), dtype=ACC)
    for p in range(0, parts):
        top = tl.maximum(top, tl.load(part_ptr + p * stride_part + offs, mask=ok, other=float("-inf")))
    safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((BLOCK,), dtype=ACC)
    for p in range(0, parts):
        m = tl.load(part_ptr + p * stride_part + offs, mask=ok, other=float("-inf"))
        s = tl.load(part_ptr + stride_stat + p * stride_part + offs, mask=ok, other=0.0)
        total += s * tl.exp(m - safe)
    tl.store(out_ptr + offs, safe + tl.log(tl.where(ok, total, 1.0)), mask=ok)


@triton.jit
def _two_exps(s_row, s_col, r, c, g_r, g_c):
    """P of a tile with one exp per statistic: ``g_r exp(s_row - r) + g_c exp(s_col - c)``."""
    return g_r[:, None] * tl.exp(s_row - r[:, None]) + g_c[None, :] * tl.exp(s_col - c[None, :])


@triton.jit
def _lse_bwd_p_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
    sigma_ptr, p_ptr,
    I, J, D,
    stride_an, stride_ad, stride_bm, stride_bd, stride_p,
    I_KEY, J_KEY, D_KEY,
    NORMALIZE: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    positives_ptr=None, row_groups_ptr=None, col_groups_ptr=None,
    row_threshold_ptr=None, col_threshold_ptr=None, row0=0, col0=0,
    EXCLUDE_DIAGONAL: tl.constexpr = False, HAS_GROUPS: tl.constexpr = False,
    HAS_ROW_THRESHOLD: tl.constexpr = False, HAS_COL_THRESHOLD: tl.constexpr = False,
):
    """One tile of ``sigma * P`` for the block a[:I] x b[:J] (pointers already offset;
    the block's first row and column in the whole matrix are row0, col0, for the
    diagonal rule). The rules make P 0 where an entry is excluded, per term."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    MASKED: tl.constexpr = EXCLUDE_DIAGONAL or HAS_GROUPS or HAS_ROW_THRESHOLD or HAS_COL_THRESHOLD
    SPLIT: tl.constexpr = HAS_ROW_THRESHOLD or HAS_COL_THRESHOLD
    pid = tl.program_id(0)
    tiles_j = tl.cdiv(J, BLOCK_N)
    rows = (pid // tiles_j) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_j) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < I
    col_ok = cols < J
    # The epilogue's operands are requested before the K-loop (latency hidden).
    row_fac = row_factors(tl.load(scale_ptr).to(ACC), ra_ptr, rows, row_ok, NORMALIZE, ACC, BLOCK_M)
    col_fac = tl.full((BLOCK_N,), 1.0, dtype=ACC)
    if NORMALIZE:
        col_fac = tl.load(rb_ptr + cols, mask=col_ok, other=0.0)
    sigma = tl.load(sigma_ptr).to(ACC)
    r = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    c = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    g_r = tl.load(g_row_ptr + rows, mask=row_ok, other=0.0).to(ACC) * sigma
    g_c = tl.load(g_col_ptr + cols, mask=col_ok, other=0.0).to(ACC) * sigma
    r_shift = r
    c_shift = c
    if MASKED:
        positive = tl.load(positives_ptr + rows, mask=row_ok, other=-1).to(tl.int32) - col0
        row_groups, row_threshold = _rule_vectors(row_groups_ptr, row_threshold_ptr, rows, row_ok,
                                                  HAS_GROUPS, HAS_ROW_THRESHOLD)
        # A row (column) with every entry excluded has lse -inf: shifting its terms
        # by +inf instead makes each exp(-inf) = 0, never exp(+inf) or NaN.
        r_shift = tl.where(r > float("-inf"), r, float("inf"))
        c_shift = tl.where(c > float("-inf"), c, float("inf"))
    acc = tile_dot(a_ptr, b_ptr, row_offsets(rows, I, stride_an), row_offsets(cols, J, stride_bm), D,
                   stride_ad, stride_bd, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, ACC)
    s = acc * row_fac[:, None]
    if NORMALIZE:
        s = s * col_fac[None, :]
    s_col = s
    if MASKED:  # the forward's decisions, from the same S (module docstring: ties)
        col_groups, col_threshold = _rule_vectors(col_groups_ptr, col_threshold_ptr, cols, col_ok,
                                                  HAS_GROUPS, HAS_COL_THRESHOLD)
        s, s_col = _excluded(s, rows + (row0 - col0), cols, positive, row_groups, col_groups,
                             row_threshold, col_threshold, EXCLUDE_DIAGONAL, HAS_GROUPS,
                             HAS_ROW_THRESHOLD, HAS_COL_THRESHOLD)
    if SPLIT:  # the row and the column terms keep different entries: an exp each
        p = _two_exps(s, s_col, r_shift, c_shift, g_r, g_c)
    else:
        top = tl.max(tl.where(row_ok, r, float("-inf")), axis=0)
        lowest = tl.min(tl.where(col_ok, c_shift, float("inf")), axis=0)
        if MASKED:  # every row of the tile may be without entries
            top = tl.where(top > float("-inf"), top, 0.0)
        if top - lowest <= FAST:
            # exp(s - c_j) = exp(s - r_i) * exp(r_i - top) * exp(top - c_j): one exp per logit.
            x = tl.exp(s - r_shift[:, None])
            u = tl.exp(r - top)
            v = g_c * tl.exp(top - c_shift)
            p = x * (g_r[:, None] + u[:, None] * v[None, :])
        else:
            p = _two_exps(s, s_col, r_shift, c_shift, g_r, g_c)
    p_ptrs = p_ptr + rows.to(tl.int64)[:, None] * stride_p + cols[None, :]
    tl.store(p_ptrs, p.to(p_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --- launchers -------------------------------------------------------------------

# The kernels' constexpr flags of the rules; all off is the unmasked primitive,
# compiled without a line of the masks. They are part of every autotune key:
# each set of rules is tuned apart.
RULE_FLAGS = ("EXCLUDE_DIAGONAL", "HAS_GROUPS", "HAS_ROW_THRESHOLD", "HAS_COL_THRESHOLD")
NO_RULES = (False, None, None, None, None, None)


def _tile_kernel(kernel, device, dtype, key, restore=(), flags=None):
    """The autotuned tile kernel, for the rules ``flags`` (None: the unmasked primitive).

    With a rule on, the forward keeps its first candidate only: the others
    spill registers under the masks' per-column vectors on sm80 or sm90
    (compiled ahead of time: tests/test_triton_logsumexp.py), the first of
    each table does not (triton 3.9; 3.6 gives it a stack frame of 8 to 16
    bytes). With a threshold on, the backward keeps the candidates of that
    one's BLOCK_K: the forward and the backward must compute S in the same
    order of sums over D to decide its ties alike (module docstring: ties)."""
    keep = "all"
    if flags and any(flags.values()):
        thresholds = flags["HAS_ROW_THRESHOLD"] or flags["HAS_COL_THRESHOLD"]
        keep = "first" if kernel is _lse_fwd_kernel else "block_k" if thresholds else "all"
    return _launch.tuned(kernel, "tile", device, dtype, tuple(key) + RULE_FLAGS, restore, keep=keep)


def _rule_flags(rules) -> dict:
    exclude_diagonal, _, row_groups, _, row_threshold, col_threshold = rules
    return dict(EXCLUDE_DIAGONAL=exclude_diagonal, HAS_GROUPS=row_groups is not None,
                HAS_ROW_THRESHOLD=row_threshold is not None, HAS_COL_THRESHOLD=col_threshold is not None)


def _rule_tensors(rules, flags):
    """(positives, row_groups, row_threshold), (col_groups, col_threshold): what the
    kernels read, all None when no rule is on (positives then exempt nothing)."""
    _, positives, row_groups, col_groups, row_threshold, col_threshold = rules
    if not any(flags.values()):
        positives = None
    return (positives, row_groups, row_threshold), (col_groups, col_threshold)


def _rule_pointers(row_side, col_side) -> dict:
    (positives, row_groups, row_threshold), (col_groups, col_threshold) = row_side, col_side
    return dict(positives_ptr=positives, row_groups_ptr=row_groups, col_groups_ptr=col_groups,
                row_threshold_ptr=row_threshold, col_threshold_ptr=col_threshold)


def _forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, normalize: bool, rules=NO_RULES):
    """(row_lse, col_lse); ``rules``: the masked primitive's six rule arguments
    (Exclusions.as_args() of mmkernels/ops/masked_logsumexp.py)."""
    n, d = a.shape
    m = b.shape[0]
    dtype = compute_dtype(a.dtype)
    ra, rb = _launch.inverse_norms(a, b, normalize, scale)
    flags = _rule_flags(rules)
    # Autotuning runs every candidate: one with more row groups or column splits
    # than the winner would leave its extra rows of partials behind, so they
    # are restored to their neutral start after each trial.
    kernel = _tile_kernel(_lse_fwd_kernel, a.device, a.dtype, ("N_KEY", "M_KEY", "D_KEY"),
                          ("row_part_ptr", "col_part_ptr"), flags)
    split = _launch.forward_grid(n, m, a.device)
    # Partials for the largest split any candidate config may pick; rows a
    # config leaves unused keep the neutral (max -inf, sum 0).
    splits = [split(c.kwargs) for c in kernel.configs]
    groups = max(s[0] for s in splits)
    col_splits = max(s[1] for s in splits)
    row_part = torch.empty((2, col_splits, n), device=a.device, dtype=dtype)
    col_part = torch.empty((2, groups, m), device=a.device, dtype=dtype)
    for part in (row_part, col_part):
        part[0].fill_(float("-inf"))
        part[1].zero_()

    _launch.launch(
        kernel, split,
        a, b, ra, rb, scale, row_part, col_part, n, m, d,
        stride_rp_stat=row_part.stride(0), stride_rp_split=row_part.stride(1),
        stride_cp_stat=col_part.stride(0), stride_cp_group=col_part.stride(1),
        N_KEY=_launch.bucket(n), M_KEY=_launch.bucket(m), D_KEY=_launch.bucket(d), FAST=FAST_RANGE,
        **_launch.tile_args(a, b, normalize), **_rule_pointers(*_rule_tensors(rules, flags)), **flags)
    return _merge(row_part), _merge(col_part)


MERGE_BLOCK = 256


def _merge(part: torch.Tensor) -> torch.Tensor:
    """Natural-log logsumexp over the partials' first axis (deterministic order)."""
    _, parts, length = part.shape
    out = part.new_empty(length)
    _launch.launch(
        _lse_merge_kernel, (triton.cdiv(length, MERGE_BLOCK),),
        part, out, parts, length, part.stride(0), part.stride(1),
        IS_FP64=part.dtype == torch.float64, BLOCK=MERGE_BLOCK)
    return out


def lse_p_scale(a_dtype: torch.dtype, g_row: torch.Tensor, g_col: torch.Tensor) -> torch.Tensor:
    """sigma with |sigma * P| <= 1 for fp16 P (else 1), as a device scalar:
    |P[i, j]| <= |g_row[i]| + |g_col[j]| since both exponentials are <= 1."""
    return _launch.fp16_p_scale(a_dtype, g_row.abs().amax() + g_col.abs().amax(), 1.0)


def _backward(a, b, scale, normalize, row_lse, col_lse, g_row, g_col, rules=NO_RULES,
              compute_pb=True, compute_pa=True):
    """(pb, pa); a product not asked for is an empty (0,) tensor and never computed
    (the P blocks then feed one product each: 3 N x M x D products instead of 4)."""
    # The kernels read the O(N) vectors with unit stride.
    row_lse, col_lse, g_row, g_col = (x.contiguous() for x in (row_lse, col_lse, g_row, g_col))
    n, d = a.shape
    m = b.shape[0]
    dtype = compute_dtype(a.dtype)
    pb = torch.empty((n, d) if compute_pb else (0,), device=a.device, dtype=dtype)
    pa = torch.empty((m, d) if compute_pa else (0,), device=a.device, dtype=dtype)
    if not (compute_pb or compute_pa):
        return pb, pa
    p_dtype = a.dtype if a.dtype in (torch.float16, torch.bfloat16) else dtype
    ra, rb = _launch.inverse_norms(a, b, normalize, scale)
    sigma = lse_p_scale(a.dtype, g_row, g_col)
    alpha = sigma.reciprocal()
    arch = _launch.arch(a.device)
    rows, cols = _launch.p_block(n, m, torch.empty((), dtype=p_dtype).element_size(), arch)
    p = torch.empty((rows, cols), device=a.device, dtype=p_dtype)
    flags = _rule_flags(rules)
    masked = any(flags.values())
    kernel = _tile_kernel(_lse_bwd_p_kernel, a.device, a.dtype, ("I_KEY", "J_KEY", "D_KEY"), (), flags)
    keys = dict(I_KEY=_launch.bucket(rows), J_KEY=_launch.bucket(cols), D_KEY=_launch.bucket(d))
    tile_args = _launch.tile_args(a, b, normalize)
    row_rules, col_rules = _rule_tensors(rules, flags)
    # Views of each block row and block column made once, not once per block:
    # the loop runs N*M / (rows*cols) times, and its host time per block must
    # stay well under the GPU's (~0.1 ms per 4096 x 4096 x 768 block on an H100).
    row_parts = _launch.blocks(n, rows, a, ra, row_lse, g_row, pb, *row_rules)
    col_parts = _launch.blocks(m, cols, b, rb, col_lse, g_col, pa, *col_rules)
    p_views = {}

    for i0, i1, (a_blk, ra_blk, row_lse_blk, g_row_blk, pb_blk, *row_rules_blk) in row_parts:
        for j0, j1, (b_blk, rb_blk, col_lse_blk, g_col_blk, pa_blk, *col_rules_blk) in col_parts:
            shape = (i1 - i0, j1 - j0)
            if shape not in p_views:
                view = p[: shape[0], : shape[1]]
                p_views[shape] = (view, view.T)
            p_blk, p_blk_t = p_views[shape]
            # Where the block lies in S, for the diagonal and the positives' columns.
            offsets = dict(row0=i0, col0=j0) if masked else {}
            _launch.launch(
                kernel, _launch.tile_grid(*shape),
                a_blk, b_blk, ra_blk, rb_blk, scale, row_lse_blk, col_lse_blk,
                g_row_blk, g_col_blk, sigma, p,
                shape[0], shape[1], d, stride_p=p.stride(0), FAST=FAST_RANGE, **keys, **tile_args,
                **_rule_pointers(row_rules_blk, col_rules_blk), **offsets, **flags)
            wanted = [(p_blk, b_blk, rb_blk if normalize else None, pb_blk, j0 > 0) if compute_pb else None,
                      (p_blk_t, a_blk, ra_blk if normalize else None, pa_blk, i0 > 0) if compute_pa else None]
            products(*wanted, alpha, key_shape=(rows, cols))
    return pb, pa


# --- registration ------------------------------------------------------------------

@triton_op("mmkernels::triton_lse_fwd", mutates_args=())
def triton_lse_fwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                   normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel contract ``fwd`` of mmkernels/ops/logsumexp.py on the Triton kernels."""
    return _forward(a, b, scale, normalize)


@triton_op("mmkernels::triton_lse_bwd", mutates_args=())
def triton_lse_bwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, normalize: bool,
                   row_lse: torch.Tensor, col_lse: torch.Tensor, g_row: torch.Tensor,
                   g_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel contract ``bwd`` of mmkernels/ops/logsumexp.py on the Triton kernels."""
    return _backward(a, b, scale, normalize, row_lse, col_lse, g_row, g_col)


@triton_op("mmkernels::triton_masked_lse_fwd", mutates_args=())
def triton_masked_lse_fwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, normalize: bool,
                          exclude_diagonal: bool, positives: torch.Tensor,
                          row_groups: Optional[torch.Tensor], col_groups: Optional[torch.Tensor],
                          row_threshold: Optional[torch.Tensor],
                          col_threshold: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel contract ``fwd`` of mmkernels/ops/masked_logsumexp.py on the Triton kernels."""
    rules = (exclude_diagonal, positives, row_groups, col_groups, row_threshold, col_threshold)
    return _forward(a, b, scale, normalize, rules)


@triton_op("mmkernels::triton_masked_lse_bwd", mutates_args=())
def triton_masked_lse_bwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, normalize: bool,
                          exclude_diagonal: bool, positives: torch.Tensor,
                          row_groups: Optional[torch.Tensor], col_groups: Optional[torch.Tensor],
                          row_threshold: Optional[torch.Tensor], col_threshold: Optional[torch.Tensor],
                          row_lse: torch.Tensor, col_lse: torch.Tensor, g_row: torch.Tensor,
                          g_col: torch.Tensor, compute_pb: bool,
                          compute_pa: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel contract ``bwd`` of mmkernels/ops/masked_logsumexp.py on the Triton kernels."""
    if not is_fake(a):  # counted per eager call, as the torch backend counts them
        masked_logsumexp.PRODUCTS_COMPUTED.update(["S"] + ["pb"] * compute_pb + ["pa"] * compute_pa)
    rules = (exclude_diagonal, positives, row_groups, col_groups, row_threshold, col_threshold)
    return _backward(a, b, scale, normalize, row_lse, col_lse, g_row, g_col, rules, compute_pb, compute_pa)
