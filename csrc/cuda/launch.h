// Launchers of the CUDA kernels (kernels.cu), called by the host code of the
// ops (ops_cuda.cpp). Plain C++ over raw device pointers, so that nvcc compiles
// only the kernels and none of ATen's headers.
//
// Every launcher takes the operands `a` (n, d) and `b` (m, d), contiguous, in
// the input dtype; `ra`, `rb` (n,), (m,) inverse row norms in the compute
// dtype, or null when not normalizing; `scale`, one compute-dtype value on the
// device. The logits are S[i, j] = (scale * ra[i]) * rb[j] * <a_i, b_j>,
// computed tile by tile (64 x 64) with fp32 accumulation (fp64 for fp64):
// tensor cores (WMMA) for fp16/bf16, CUDA cores for fp32/fp64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mmkernels::cuda {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

// Rows and columns of S per thread block.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 64;

struct Operands {
  DType dtype;           // of a and b; the compute dtype is kDouble for kDouble, else kFloat
  const void* a;
  const void* b;
  int64_t n, m, d;
  const void* ra;        // may be null
  const void* rb;        // may be null
  const void* scale;
};

// The exclusion rules of the masked primitive (mmkernels/ops/masked_logsumexp.py)
// as device pointers, null where a rule is off: positives (n,) int64, -1 for
// a row without one (null: no row has one); row_groups (n,) and col_groups (m,)
// int64, both or neither; row_threshold (n,) and col_threshold (m,) in the
// compute dtype. An entry leaves a statistic as the docstring there says; with
// no rule on (the default) the kernels are the unmasked primitive's.
struct Rules {
  bool exclude_diagonal = false;
  const int64_t* positives = nullptr;
  const int64_t* row_groups = nullptr;
  const int64_t* col_groups = nullptr;
  const void* row_threshold = nullptr;
  const void* col_threshold = nullptr;

  bool any() const {
    return exclude_diagonal || row_groups != nullptr || row_threshold != nullptr || col_threshold != nullptr;
  }
};

// Forward over the band of rows [row0, row0 + rows): row_lse of those rows
// (row_lse points at row 0), and per block of 64 rows the column statistics
// part_max/part_sum (ceil(rows / 64), m): the max of each column over the
// block's rows and the sum of exp(logit - that max). Entries the rules
// exclude count as -inf: a row or column block with nothing left has max
// -inf and sum 0, so row_lse = -inf.
cudaError_t lse_fwd_band(const Operands& x, const Rules& rules, int64_t row0, int64_t rows, void* row_lse,
                         void* part_max, void* part_sum, cudaStream_t stream);

// Folds `parts` rows of column statistics into the running col_max/col_sum (m,).
cudaError_t merge_col_stats(DType compute, const void* part_max, const void* part_sum, int64_t parts,
                            int64_t m, void* col_max, void* col_sum, cudaStream_t stream);

// Backward over a band of rows: writes P[i - row0, j] = g_row[i] * exp(S[i, j] - row_lse[i])
// + g_col[j] * exp(S[i, j] - col_lse[j]) into p (rows, m), of dtype p_dtype
// (the compute dtype, or kBFloat16 for bf16 inputs); a term is 0 where the
// rules exclude the entry from that row's (column's) statistic. S is the
// forward's bit for bit (same tiles, same k order, same epilogue products),
// so a threshold decides a tie as the forward did.
cudaError_t lse_bwd_band(const Operands& x, const Rules& rules, int64_t row0, int64_t rows, const void* row_lse,
                         const void* g_row, const void* col_lse, const void* g_col, void* p,
                         DType p_dtype, cudaStream_t stream);

// SigLIP (mmkernels/ops/siglip.py): x[i, j] = S[i, j] + bias, `bias` one
// compute-dtype value on the device; the positive pairs are i == j when
// `positives`, none otherwise.
//
// Forward: row_loss (n,) = sum_j softplus(-z[i, j] * x[i, j]), one block per 64
// rows walking every column tile (deterministic: no atomics).
cudaError_t siglip_fwd(const Operands& x, const void* bias, bool positives, void* row_loss,
                       cudaStream_t stream);

// Backward over a band of rows: P[i - row0, j] = g_row[i] * (sigmoid(x[i, j]) - [i, j positive])
// into p (rows, m) of dtype p_dtype (as lse_bwd_band), and the row sums of P per
// 64 columns, in the compute dtype before P's rounding, into part (rows, ceil(m / 64)).
cudaError_t siglip_bwd_band(const Operands& x, int64_t row0, int64_t rows, const void* bias, bool positives,
                            const void* g_row, void* p, DType p_dtype, void* part, cudaStream_t stream);

// normalized_similarity: out (n, m) in the input dtype = S (ra and rb given).
cudaError_t similarity_fwd(const Operands& x, void* out, cudaStream_t stream);

}  // namespace mmkernels::cuda

namespace mmkernels::cuda {

// Rows of S per band (host code, ops_cuda.cpp): the forward keeps column
// statistics per 64 rows of a band, the backward writes P one band at a time.
// 0 (the default) sizes bands to about 256 MiB of that scratch; tests set a
// small count so that small shapes span several bands. Returns the previous value.
int64_t set_band_rows(int64_t rows);

}  // namespace mmkernels::cuda
