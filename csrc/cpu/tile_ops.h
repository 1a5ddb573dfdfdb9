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

template <typename T>
struct TileOps {
  // Running statistics: row_max/row_sum have `rows` entries, col_max/col_sum
  // `cols`; maxima start at -inf, sums at 0. `work` holds cols + rows values.
  void (*fold_stats)(const T* s, int64_t rows, int64_t cols, int64_t ld, T* row_max,
                     T* row_sum, T* col_max, T* col_sum, T* work);
  void (*softmax_grad)(T* s, int64_t rows, int64_t cols, int64_t ld, const T* row_lse,
                       const T* g_row, const T* col_lse, const T* g_col);
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
