// Elementwise work on one S tile of the CPU kernels: the parts between the
// tile matrix products that run once per logit (exp, max, sums).
//
// A tile is `rows x cols` logits, row-major with leading dimension `ld`, that
// a matrix product just wrote (so it is in cache). Two operations:
//
//   fold_stats     forward: fold the tile into running (max, sum of exp)
//                  statistics of its rows and of its columns (2 exps per logit)
//   softmax_grad   backward: overwrite the tile S with
//                  P = g_row * exp(S - row_lse) + g_col * exp(S - col_lse)
//                  (2 exps per logit)
//   fold_stats_masked, softmax_grad_masked
//                  the same with exclusions (mmkernels/ops/masked_logsumexp.py):
//                  an excluded entry counts as -inf in the statistic it leaves
//                  (so P = 0 there); a compare or two per logit
//   siglip_loss    SigLIP forward: add each row's sum of softplus(-z * (s + bias))
//                  to its running loss (1 exp, 1 log1p per logit)
//   siglip_grad    SigLIP backward: overwrite the tile with
//                  P = g_row * (sigmoid(s + bias) - [positive]) and add each
//                  row's sum of P to p_row (1 exp per logit)
//
// SigLIP's positive pairs (z = +1; mmkernels/ops/siglip.py) are one diagonal of
// the tile: row r's is column r + diag when `positives` and 0 <= r + diag < cols
// (diag = the tile's first global row minus its first global column).
//
// float has SIMD versions (AVX-512, AVX2+FMA; x86-64 with GCC or clang), chosen
// at run time from what the CPU supports, so the distributed binary needs no
// -march flag; double, and float on other CPUs, use the portable version.
// This header is plain C++ (no torch) so the SIMD translation units compile
// fast and carry no inline functions of other libraries (see tile_ops_simd.inc).
#pragma once

#include <cstdint>

namespace mmkernels::cpu {

// The exclusion rules as one tile sees them (tile row r is global row i0 + r,
// tile column c global column j0 + c). Entry (r, c) leaves both statistics when
// `exclude_diagonal` and c == r + diag, or row_groups[r] == col_groups[c]; it
// leaves its row's when s > row_threshold[r], its column's when s > col_threshold[c];
// never when c == positives[r] - col0 (the row's positive). Null pointers: rule off.
template <typename T>
struct TileExclusions {
  bool exclude_diagonal;
  int64_t diag;              // i0 - j0
  const int64_t* positives;  // rows: global positive columns, -1 for none
  int64_t col0;              // j0
  // Groups as values of T, so that SIMD lanes compare them: the kernels renumber
  // them 0, 1, ... (exact in float up to 2^24 distinct groups).
  const T* row_groups;     // rows
  const T* col_groups;     // cols
  const T* row_threshold;  // rows
  const T* col_threshold;  // cols
  // Optional, for speed only (null: any row may meet its group here): row r has a
  // member of its group among this tile's columns only where group_hits[r * group_hits_stride]
  // is nonzero, so the other rows skip the group compare.
  const uint8_t* group_hits;
  int64_t group_hits_stride;
};

template <typename T>
struct TileOps {
  // Running statistics: row_max/row_sum have `rows` entries, col_max/col_sum
  // `cols`; maxima start at -inf, sums at 0. `work` holds cols + rows values.
  void (*fold_stats)(const T* s, int64_t rows, int64_t cols, int64_t ld, T* row_max,
                     T* row_sum, T* col_max, T* col_sum, T* work);
  void (*softmax_grad)(T* s, int64_t rows, int64_t cols, int64_t ld, const T* row_lse,
                       const T* g_row, const T* col_lse, const T* g_col);
  void (*fold_stats_masked)(const T* s, int64_t rows, int64_t cols, int64_t ld, T* row_max,
                            T* row_sum, T* col_max, T* col_sum, T* work, const TileExclusions<T>& rules);
  // row_lse and col_lse as shifts: -inf (every entry excluded) replaced by 0.
  void (*softmax_grad_masked)(T* s, int64_t rows, int64_t cols, int64_t ld, const T* row_lse,
                              const T* g_row, const T* col_lse, const T* g_col,
                              const TileExclusions<T>& rules);
  void (*siglip_loss)(const T* s, int64_t rows, int64_t cols, int64_t ld, T bias, bool positives,
                      int64_t diag, T* row_loss);
  void (*siglip_grad)(T* s, int64_t rows, int64_t cols, int64_t ld, T bias, bool positives,
                      int64_t diag, const T* g_row, T* p_row);
  const char* isa;  // "avx512", "avx2" or "generic"
};

// The kernels in use: for float the best instruction set this CPU supports
// (or the one forced by set_isa), for double the portable ones.
const TileOps<float>& tile_ops_f32();
const TileOps<double>& tile_ops_f64();

// Instruction sets compiled into this binary that this CPU can run, best first.
const char* const* supported_isas(int* count);

// Force the float kernels onto `isa` (tests compare all of them); returns
// false, changing nothing, if it is unknown or unsupported here.
bool set_isa(const char* isa);

// The portable kernels (tile_ops.cpp), also the reference for the SIMD ones.
template <typename T>
TileOps<T> generic_tile_ops();

// SIMD kernels (tile_ops_avx2.cpp, tile_ops_avx512.cpp); `available` is false
// when the translation unit was compiled without them (non-x86, other compilers).
struct SimdVariant {
  bool available;
  TileOps<float> ops;
};
SimdVariant avx2_tile_ops();
SimdVariant avx512_tile_ops();

}  // namespace mmkernels::cpu
