// CUDA kernels of the primitive and of normalized_similarity (launch.h says
// what each computes). One thread block of 128 threads owns a 64 x 64 tile of
// S: it computes the tile's dot products into shared memory (WMMA on tensor
// cores for fp16/bf16, a register-blocked CUDA-core loop for fp32/fp64, fp32
// or fp64 accumulation) and an epilogue reads them back:
//
//   lse_fwd_kernel     a block walks its 64 rows across all column tiles:
//                      online (max, sum of exp) per row in registers, and per
//                      column tile the column statistics of its 64 rows,
//                      written out (merge_col_stats_kernel folds them)
//   lse_bwd_p_kernel   P for one tile, written out (the host multiplies P by
//                      the operands with cuBLAS)
//                      Both take kMasked: with it, the exclusion rules
//                      (launch.h's Rules) mask each tile; without it they
//                      are the unmasked primitive's kernels, code for code
//   similarity_kernel  the rank-1 rescaled tile, rounded to the output dtype
//   siglip_fwd_kernel  a block walks its 64 rows across all column tiles,
//                      two threads a row (one per half tile) summing softplus
//   siglip_bwd_p_kernel  SigLIP's P for one tile, written out, and its row sums
//
// Simple by design: plain global loads (zero-filled past the edges), no
// asynchronous copies or software pipelining.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <mma.h>

#include <cstdint>

#include "../int_math.h"
#include "launch.h"

namespace mmkernels::cuda {
namespace {

constexpr int BM = static_cast<int>(kTileRows);
constexpr int BN = static_cast<int>(kTileCols);
constexpr int kThreads = 128;
constexpr int kLdc = BN + 4;  // row stride of the tile of dot products (wmma: a multiple of 4)

// Blocks per SM that every kernel leaves registers for (__launch_bounds__'s
// second argument). Without it ptxas chose its own cap and spilled on sm_80
// (lse_fwd_kernel for fp16/bf16/fp64, similarity_kernel<bf16>); 4 blocks
// allow 128 registers a thread, and fp64's tiles need 3 (170 registers).
// tests/test_cuda_resources.py fails on any spill.
template <typename T> constexpr int kMinBlocks = 4;
template <> constexpr int kMinBlocks<double> = 3;
// The masked fp64 forward spilled at 3 blocks (sm_80 and sm_90): 2 leave it 255 registers.
template <typename T, bool kMasked> constexpr int kFwdMinBlocks = kMinBlocks<T>;
template <> constexpr int kFwdMinBlocks<double, true> = 2;

// --- element types --------------------------------------------------------------

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> __device__ __forceinline__ T zero();
template <> __device__ __forceinline__ __half zero<__half>() { return __float2half_rn(0.0f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero<__nv_bfloat16>() { return __float2bfloat16_rn(0.0f); }
template <> __device__ __forceinline__ float zero<float>() { return 0.0f; }
template <> __device__ __forceinline__ double zero<double>() { return 0.0; }

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }
__device__ __forceinline__ float neg_inf(float) { return -CUDART_INF_F; }
__device__ __forceinline__ double neg_inf(double) { return -CUDART_INF; }

// The shift for exps against a running maximum: 0 while it is still -inf,
// so that exp(-inf - shift) = 0 rather than NaN (csrc/cpu/tile_ops_simd.inc).
template <typename A>
__device__ __forceinline__ A safe_shift(A m) { return m == neg_inf(m) ? A(0) : m; }

template <typename A>
__device__ __forceinline__ A max_(A x, A y) { return x > y ? x : y; }

template <typename A>
__device__ __forceinline__ A abs_(A x) { return x < A(0) ? -x : x; }

// softplus(u) = max(u, 0) + log1p(exp(-|u|)): no overflow, full relative
// precision where it is tiny (mmkernels/ops/siglip.py). NaN for NaN.
template <typename A>
__device__ __forceinline__ A softplus(A u) { return max_(u, A(0)) + log1p_(exp_(-abs_(u))); }

// sigmoid(u) from e = exp(-|u|) <= 1: no overflow, tiny values keep their relative precision.
template <typename A>
__device__ __forceinline__ A sigmoid(A u) {
  const A e = exp_(-abs_(u));
  return (u >= A(0) ? A(1) : e) / (A(1) + e);
}

// --- tile products: C[i][j] = <a_{row0+i}, b_{col0+j}>, zero past the edges ---------

// Loads a 64 x BK slice of rows [row0, row0 + 64) x columns [k0, k0 + BK) of a
// (rows, d) matrix into shared memory, zero past `rows` and `d`.
template <int BK, int LD, typename T>
__device__ __forceinline__ void load_slice(T (*dst)[LD], const T* src, int64_t rows, int64_t d,
                                           int64_t row0, int64_t k0) {
  for (int e = threadIdx.x; e < 64 * BK; e += kThreads) {
    const int r = e / BK, k = e % BK;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[r][k] = (gr < rows && gk < d) ? src[gr * d + gk] : zero<T>();
  }
}

// fp32/fp64 on CUDA cores: each thread accumulates 4 rows x 8 columns in registers.
template <typename T>
struct SimtTile {
  using Acc = T;
  static constexpr int BK = 16;
  static constexpr int LD = BK + 1;  // odd stride: no shared-memory bank conflicts
  struct Smem {
    T a[BM][LD];
    T b[BN][LD];
  };

  __device__ static void compute(const T* a, const T* b, int64_t n, int64_t m, int64_t d, int64_t row0,
                                 int64_t col0, Smem& sm, Acc (*c)[kLdc]) {
    const int tr = threadIdx.x / 8;  // rows 4 * tr .. 4 * tr + 3
    const int tc = threadIdx.x % 8;  // columns tc, tc + 8, ..., tc + 56
    Acc acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = Acc(0);
    for (int64_t k0 = 0; k0 < d; k0 += BK) {
      load_slice<BK, LD>(sm.a, a, n, d, row0, k0);
      load_slice<BK, LD>(sm.b, b, m, d, col0, k0);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        Acc av[4], bv[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = sm.a[4 * tr + i][k];
#pragma unroll
        for (int j = 0; j < 8; ++j) bv[j] = sm.b[tc + 8 * j][k];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] += av[i] * bv[j];  // contracted to FMA
      }
      __syncthreads();  // before the next slice (or the epilogue's c) overwrites sm
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) c[4 * tr + i][tc + 8 * j] = acc[i][j];
  }
};

// fp16/bf16 on tensor cores: 4 warps in 2 x 2, each 32 x 32 of C as 2 x 2
// WMMA 16 x 16 x 16 fragments with fp32 accumulators.
template <typename T>
struct WmmaTile {
  using Acc = float;
  static constexpr int BK = 32;
  static constexpr int LD = BK + 8;  // wmma: a multiple of 8 16-bit elements; skews banks
  struct Smem {
    T a[BM][LD];
    T b[BN][LD];
  };

  __device__ static void compute(const T* a, const T* b, int64_t n, int64_t m, int64_t d, int64_t row0,
                                 int64_t col0, Smem& sm, Acc (*c)[kLdc]) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t k0 = 0; k0 < d; k0 += BK) {
      load_slice<BK, LD>(sm.a, a, n, d, row0, k0);
      load_slice<BK, LD>(sm.b, b, m, d, col0, k0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        // B tile stored [column of S][k]: a col_major K x N operand, so acc += A @ B^T.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.a[wr + 16 * i][kk], LD);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sm.b[wc + 16 * j][kk], LD);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&c[wr + 16 * i][wc + 16 * j], acc[i][j], kLdc, wmma::mem_row_major);
#else
    __trap();  // fp16/bf16 tiles need sm_80 or newer (checked on the host)
#endif
  }
};

template <typename T> struct TileFor { using type = SimtTile<T>; };
template <> struct TileFor<__half> { using type = WmmaTile<__half>; };
template <> struct TileFor<__nv_bfloat16> { using type = WmmaTile<__nv_bfloat16>; };

// Shared memory of a block: the operand slices while the tile is computed,
// then (same bytes) the tile of dot products for the epilogue.
template <class Tile>
struct SharedTile {
  using Acc = typename Tile::Acc;
  static constexpr size_t kSliceBytes = sizeof(typename Tile::Smem);
  static constexpr size_t kTileBytes = sizeof(Acc) * BM * kLdc;
  static constexpr size_t kBytes = kSliceBytes > kTileBytes ? kSliceBytes : kTileBytes;
};

#define MMK_SHARED_TILE(Tile, slices, c)                                                     \
  __shared__ __align__(128) unsigned char shared_raw[SharedTile<Tile>::kBytes];              \
  auto& slices = *reinterpret_cast<typename Tile::Smem*>(shared_raw);                        \
  auto c = reinterpret_cast<typename Tile::Acc(*)[kLdc]>(shared_raw)

template <typename A>
__device__ __forceinline__ A row_factor(const A* scale, const A* ra, int64_t i) {
  return ra == nullptr ? *scale : *scale * ra[i];
}

template <typename A>
__device__ __forceinline__ A col_factor(const A* rb, int64_t j) {
  return rb == nullptr ? A(1) : rb[j];
}

// --- the exclusion rules (mmkernels/ops/masked_logsumexp.py) -------------------------

// launch.h's Rules with typed thresholds: a kernel parameter.
template <typename A>
struct MaskRules {
  bool exclude_diagonal;
  const int64_t* positives;
  const int64_t* row_groups;
  const int64_t* col_groups;
  const A* row_threshold;
  const A* col_threshold;
};

// What the mask of a 64 x 64 tile reads, staged in shared memory from O(64)
// loads (the rows' positives, groups and thresholds, the columns' groups and
// thresholds), so that deciding an entry is a few compares on shared values.
template <typename A>
struct TileMask {
  int64_t positive[BM], row_group[BM], col_group[BN];
  A row_threshold[BM], col_threshold[BN];

  // Threads 0..63 stage rows r0.., threads 64..127 columns c0.. (nothing past the edges).
  __device__ void stage_rows(const MaskRules<A>& r, int64_t r0, int64_t rows_end) {
    const int i = threadIdx.x;
    if (i >= BM || r0 + i >= rows_end) return;
    positive[i] = r.positives != nullptr ? r.positives[r0 + i] : -1;
    if (r.row_groups != nullptr) row_group[i] = r.row_groups[r0 + i];
    if (r.row_threshold != nullptr) row_threshold[i] = r.row_threshold[r0 + i];
  }

  __device__ void stage_cols(const MaskRules<A>& r, int64_t c0, int64_t m) {
    const int j = static_cast<int>(threadIdx.x) - BM;
    if (j < 0 || j >= BN || c0 + j >= m) return;
    if (r.col_groups != nullptr) col_group[j] = r.col_groups[c0 + j];
    if (r.col_threshold != nullptr) col_threshold[j] = r.col_threshold[c0 + j];
  }

  // Entry (i, j) of the tile, global (gi, gj), logit s: out of both
  // statistics (diagonal, groups), of row i's (row threshold), of column j's
  // (column threshold); never the row's positive. A NaN logit compares false: it stays.
  __device__ bool common(const MaskRules<A>& r, int i, int j, int64_t gi, int64_t gj) const {
    return (r.exclude_diagonal && gi == gj) || (r.row_groups != nullptr && row_group[i] == col_group[j]);
  }
  __device__ bool out_of_row(const MaskRules<A>& r, int i, int j, int64_t gi, int64_t gj, A s) const {
    return (common(r, i, j, gi, gj) || (r.row_threshold != nullptr && s > row_threshold[i])) && gj != positive[i];
  }
  __device__ bool out_of_col(const MaskRules<A>& r, int i, int j, int64_t gi, int64_t gj, A s) const {
    return (common(r, i, j, gi, gj) || (r.col_threshold != nullptr && s > col_threshold[j])) && gj != positive[i];
  }
};

// --- kernels ----------------------------------------------------------------------

// Bit k of `kept`: entry k of a thread's row (column) of the tile stays in
// its statistic. Always true unmasked, where `kept` is never written.
template <bool kMasked>
__device__ __forceinline__ bool stays(uint64_t kept, int k) { return !kMasked || ((kept >> k) & 1u); }

template <typename T, bool kMasked>
__global__ void __launch_bounds__(kThreads, kFwdMinBlocks<T, kMasked>)
lse_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t m, int64_t d,
               const typename AccOf<T>::type* ra, const typename AccOf<T>::type* rb,
               const typename AccOf<T>::type* scale, MaskRules<typename AccOf<T>::type> rules, int64_t row0,
               int64_t band_end, typename AccOf<T>::type* row_lse, typename AccOf<T>::type* part_max,
               typename AccOf<T>::type* part_sum) {
  using Tile = typename TileFor<T>::type;
  using A = typename AccOf<T>::type;
  MMK_SHARED_TILE(Tile, slices, c);
  __shared__ TileMask<A> mask;  // unreferenced, so not allocated, unmasked
  const int t = threadIdx.x;
  const int64_t r0 = row0 + static_cast<int64_t>(blockIdx.x) * BM;
  const int rows = static_cast<int>(band_end - r0 < BM ? band_end - r0 : BM);
  // Threads 0..63 own a row each; threads 64..127 a column of the current tile.
  const bool owns_row = t < rows;
  const A sa = owns_row ? row_factor(scale, ra, r0 + t) : A(0);
  A run_max = neg_inf(A(0)), run_sum = 0;
  if constexpr (kMasked) mask.stage_rows(rules, r0, band_end);

  // An excluded entry counts as -inf: it is skipped in the max and the sum, so
  // a statistic with nothing left keeps max -inf, shift 0 and sum 0 (no NaN).
  for (int64_t c0 = 0; c0 < m; c0 += BN) {
    Tile::compute(a, b, band_end, m, d, r0, c0, slices, c);
    if constexpr (kMasked) mask.stage_cols(rules, c0, m);
    __syncthreads();
    const int cols = static_cast<int>(m - c0 < BN ? m - c0 : BN);
    if (owns_row) {
      A tile_max = neg_inf(A(0));
      uint64_t kept = ~uint64_t{0};
      if constexpr (kMasked) {
        for (int j = 0; j < cols; ++j) {
          const A s = sa * col_factor(rb, c0 + j) * c[t][j];
          if (mask.out_of_row(rules, t, j, r0 + t, c0 + j, s)) {
            kept &= ~(uint64_t{1} << j);
          } else {
            tile_max = max_(tile_max, s);
          }
        }
      } else {
        for (int j = 0; j < cols; ++j) tile_max = max_(tile_max, sa * col_factor(rb, c0 + j) * c[t][j]);
      }
      const A new_max = max_(run_max, tile_max);
      const A shift = safe_shift(new_max);
      A sum = 0;
      for (int j = 0; j < cols; ++j)
        if (stays<kMasked>(kept, j)) sum += exp_(sa * col_factor(rb, c0 + j) * c[t][j] - shift);
      run_sum = run_sum * exp_(run_max - shift) + sum;
      run_max = new_max;
    } else if (t >= BM && t - BM < cols) {
      const int j = t - BM;
      const A rbj = col_factor(rb, c0 + j);
      A col_max = neg_inf(A(0));
      uint64_t kept = ~uint64_t{0};
      if constexpr (kMasked) {
        for (int i = 0; i < rows; ++i) {
          const A s = row_factor(scale, ra, r0 + i) * rbj * c[i][j];
          if (mask.out_of_col(rules, i, j, r0 + i, c0 + j, s)) {
            kept &= ~(uint64_t{1} << i);
          } else {
            col_max = max_(col_max, s);
          }
        }
      } else {
        for (int i = 0; i < rows; ++i) col_max = max_(col_max, row_factor(scale, ra, r0 + i) * rbj * c[i][j]);
      }
      const A shift = safe_shift(col_max);
      A sum = 0;
      for (int i = 0; i < rows; ++i)
        if (stays<kMasked>(kept, i)) sum += exp_(row_factor(scale, ra, r0 + i) * rbj * c[i][j] - shift);
      const int64_t at = static_cast<int64_t>(blockIdx.x) * m + c0 + j;
      part_max[at] = col_max;
      part_sum[at] = sum;
    }
    __syncthreads();  // the next tile overwrites c
  }
  if (owns_row) row_lse[r0 + t] = run_max + log_(run_sum);
}

template <typename A>
__global__ void merge_col_stats_kernel(const A* part_max, const A* part_sum, int64_t parts, int64_t m,
                                       A* col_max, A* col_sum) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= m) return;
  A run_max = col_max[j], run_sum = col_sum[j];
  for (int64_t p = 0; p < parts; ++p) {
    const A pm = part_max[p * m + j], ps = part_sum[p * m + j];
    const A new_max = max_(run_max, pm);
    const A shift = safe_shift(new_max);
    run_sum = run_sum * exp_(run_max - shift) + ps * exp_(pm - shift);
    run_max = new_max;
  }
  col_max[j] = run_max;
  col_sum[j] = run_sum;
}

// S here is the forward's bit for bit: the same Tile::compute on the same
// 64 x 64 tile (bands start at multiples of 64), so the same k order, and the
// same epilogue products (scale * ra[i]) * rb[j] * dot; a threshold at a tie
// decides as in the forward.
template <typename T, typename P, bool kMasked>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
lse_bwd_p_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t m, int64_t d,
                 const typename AccOf<T>::type* ra, const typename AccOf<T>::type* rb,
                 const typename AccOf<T>::type* scale, MaskRules<typename AccOf<T>::type> rules, int64_t row0,
                 int64_t band_end, const typename AccOf<T>::type* row_lse, const typename AccOf<T>::type* g_row,
                 const typename AccOf<T>::type* col_lse, const typename AccOf<T>::type* g_col, P* p) {
  using Tile = typename TileFor<T>::type;
  using A = typename AccOf<T>::type;
  MMK_SHARED_TILE(Tile, slices, c);
  __shared__ TileMask<A> mask;  // unreferenced, so not allocated, unmasked
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t r0 = row0 + static_cast<int64_t>(blockIdx.y) * BM;
  Tile::compute(a, b, band_end, m, d, r0, c0, slices, c);
  if constexpr (kMasked) {
    mask.stage_rows(rules, r0, band_end);
    mask.stage_cols(rules, c0, m);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int i = e / BN, j = e % BN;  // consecutive threads: consecutive columns
    const int64_t gi = r0 + i, gj = c0 + j;
    if (gi >= band_end || gj >= m) continue;
    const A s = row_factor(scale, ra, gi) * col_factor(rb, gj) * c[i][j];
    A value;
    if constexpr (kMasked) {
      // A term is selected, not multiplied by a 0/1 mask: an excluded entry's
      // exp(s - lse) may be inf (lse = -inf when all of its row is out).
      const A row_term = mask.out_of_row(rules, i, j, gi, gj, s) ? A(0) : g_row[gi] * exp_(s - row_lse[gi]);
      const A col_term = mask.out_of_col(rules, i, j, gi, gj, s) ? A(0) : g_col[gj] * exp_(s - col_lse[gj]);
      value = row_term + col_term;
    } else {
      value = g_row[gi] * exp_(s - row_lse[gi]) + g_col[gj] * exp_(s - col_lse[gj]);
    }
    if constexpr (sizeof(P) == sizeof(A)) {
      p[(gi - row0) * m + gj] = value;
    } else {
      p[(gi - row0) * m + gj] = from_float<P>(value);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
siglip_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t n, int64_t m, int64_t d,
                  const typename AccOf<T>::type* ra, const typename AccOf<T>::type* rb,
                  const typename AccOf<T>::type* scale, const typename AccOf<T>::type* bias, bool positives,
                  typename AccOf<T>::type* row_loss) {
  using Tile = typename TileFor<T>::type;
  using A = typename AccOf<T>::type;
  MMK_SHARED_TILE(Tile, slices, c);
  __shared__ A second_half[BM];
  constexpr int kHalf = BN / 2;
  const int t = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int rows = static_cast<int>(n - r0 < BM ? n - r0 : BM);
  // Thread t sums row t % 64 over half t / 64 of every tile's columns.
  const int i = t % BM, half = t / BM;
  const int64_t gi = r0 + i;
  const bool owns_row = i < rows;
  const A sa = owns_row ? row_factor(scale, ra, gi) : A(0);
  const A shift = *bias;
  A sum = 0;
  for (int64_t c0 = 0; c0 < m; c0 += BN) {
    Tile::compute(a, b, n, m, d, r0, c0, slices, c);
    __syncthreads();
    const int cols = static_cast<int>(m - c0 < BN ? m - c0 : BN);
    const int j1 = cols < (half + 1) * kHalf ? cols : (half + 1) * kHalf;
    if (owns_row) {
      for (int j = half * kHalf; j < j1; ++j) {
        const int64_t gj = c0 + j;
        const A x = sa * col_factor(rb, gj) * c[i][j] + shift;
        sum += softplus(positives && gj == gi ? -x : x);
      }
    }
    __syncthreads();  // the next tile overwrites c
  }
  // The halves meet in a fixed order: the result does not depend on scheduling.
  if (half == 1) second_half[i] = sum;
  __syncthreads();
  if (half == 0 && owns_row) row_loss[gi] = sum + second_half[i];
}

template <typename T, typename P>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
siglip_bwd_p_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t m, int64_t d,
                    const typename AccOf<T>::type* ra, const typename AccOf<T>::type* rb,
                    const typename AccOf<T>::type* scale, const typename AccOf<T>::type* bias, bool positives,
                    int64_t row0, int64_t band_end, const typename AccOf<T>::type* g_row, P* p,
                    typename AccOf<T>::type* part) {
  using Tile = typename TileFor<T>::type;
  using A = typename AccOf<T>::type;
  MMK_SHARED_TILE(Tile, slices, c);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t r0 = row0 + static_cast<int64_t>(blockIdx.y) * BM;
  Tile::compute(a, b, band_end, m, d, r0, c0, slices, c);
  __syncthreads();
  const A shift = *bias;
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int i = e / BN, j = e % BN;  // consecutive threads: consecutive columns
    const int64_t gi = r0 + i, gj = c0 + j;
    A value = 0;
    if (gi < band_end && gj < m) {
      const A x = row_factor(scale, ra, gi) * col_factor(rb, gj) * c[i][j] + shift;
      // A positive's sigmoid(x) - 1 as -sigmoid(-x): no cancellation once the pair is learnt.
      value = g_row[gi] * (positives && gi == gj ? -sigmoid(-x) : sigmoid(x));
      if constexpr (sizeof(P) == sizeof(A)) {
        p[(gi - row0) * m + gj] = value;
      } else {
        p[(gi - row0) * m + gj] = from_float<P>(value);
      }
    }
    c[i][j] = value;  // this thread's own entry: kept for the row sums
  }
  __syncthreads();
  const int i = threadIdx.x;
  if (i < BM && r0 + i < band_end) {
    A sum = 0;
    for (int j = 0; j < BN; ++j) sum += c[i][j];  // zero past the last column
    part[(r0 + i - row0) * gridDim.x + blockIdx.x] = sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
similarity_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t n, int64_t m, int64_t d,
                  const typename AccOf<T>::type* ra, const typename AccOf<T>::type* rb,
                  const typename AccOf<T>::type* scale, T* out) {
  using Tile = typename TileFor<T>::type;
  using A = typename AccOf<T>::type;
  MMK_SHARED_TILE(Tile, slices, c);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * BM;
  Tile::compute(a, b, n, m, d, r0, c0, slices, c);
  __syncthreads();
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int i = e / BN, j = e % BN;
    const int64_t gi = r0 + i, gj = c0 + j;
    if (gi >= n || gj >= m) continue;
    const A s = row_factor(scale, ra, gi) * col_factor(rb, gj) * c[i][j];
    if constexpr (sizeof(T) == sizeof(A)) {
      out[gi * m + gj] = s;
    } else {
      out[gi * m + gj] = from_float<T>(s);
    }
  }
}

// --- launchers ------------------------------------------------------------------------

template <typename A>
MaskRules<A> mask_rules(const Rules& r) {
  return MaskRules<A>{r.exclude_diagonal, r.positives, r.row_groups, r.col_groups,
                      static_cast<const A*>(r.row_threshold), static_cast<const A*>(r.col_threshold)};
}

// The masked instantiation only when a rule is on: positives alone exclude nothing.
template <typename T, bool kMasked>
cudaError_t launch_fwd_as(const Operands& x, const Rules& rules, int64_t row0, int64_t rows, void* row_lse,
                          void* part_max, void* part_sum, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, BM)));
  lse_fwd_kernel<T, kMasked><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x.a), static_cast<const T*>(x.b), x.m, x.d, static_cast<const A*>(x.ra),
      static_cast<const A*>(x.rb), static_cast<const A*>(x.scale), mask_rules<A>(rules), row0, row0 + rows,
      static_cast<A*>(row_lse), static_cast<A*>(part_max), static_cast<A*>(part_sum));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const Operands& x, const Rules& rules, int64_t row0, int64_t rows, void* row_lse,
                       void* part_max, void* part_sum, cudaStream_t stream) {
  return rules.any() ? launch_fwd_as<T, true>(x, rules, row0, rows, row_lse, part_max, part_sum, stream)
                     : launch_fwd_as<T, false>(x, rules, row0, rows, row_lse, part_max, part_sum, stream);
}

template <typename T, typename P, bool kMasked>
cudaError_t launch_bwd_as(const Operands& x, const Rules& rules, int64_t row0, int64_t rows, const void* row_lse,
                          const void* g_row, const void* col_lse, const void* g_col, void* p, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const dim3 grid(static_cast<unsigned>(ceil_div(x.m, BN)), static_cast<unsigned>(ceil_div(rows, BM)));
  lse_bwd_p_kernel<T, P, kMasked><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x.a), static_cast<const T*>(x.b), x.m, x.d, static_cast<const A*>(x.ra),
      static_cast<const A*>(x.rb), static_cast<const A*>(x.scale), mask_rules<A>(rules), row0, row0 + rows,
      static_cast<const A*>(row_lse), static_cast<const A*>(g_row), static_cast<const A*>(col_lse),
      static_cast<const A*>(g_col), static_cast<P*>(p));
  return cudaGetLastError();
}

template <typename T, typename P>
cudaError_t launch_bwd(const Operands& x, const Rules& rules, int64_t row0, int64_t rows, const void* row_lse,
                       const void* g_row, const void* col_lse, const void* g_col, void* p, cudaStream_t stream) {
  return rules.any()
             ? launch_bwd_as<T, P, true>(x, rules, row0, rows, row_lse, g_row, col_lse, g_col, p, stream)
             : launch_bwd_as<T, P, false>(x, rules, row0, rows, row_lse, g_row, col_lse, g_col, p, stream);
}

template <typename T>
cudaError_t launch_siglip_fwd(const Operands& x, const void* bias, bool positives, void* row_loss,
                              cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const dim3 grid(static_cast<unsigned>(ceil_div(x.n, BM)));
  siglip_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x.a), static_cast<const T*>(x.b), x.n, x.m, x.d, static_cast<const A*>(x.ra),
      static_cast<const A*>(x.rb), static_cast<const A*>(x.scale), static_cast<const A*>(bias), positives,
      static_cast<A*>(row_loss));
  return cudaGetLastError();
}

template <typename T, typename P>
cudaError_t launch_siglip_bwd(const Operands& x, int64_t row0, int64_t rows, const void* bias, bool positives,
                              const void* g_row, void* p, void* part, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const dim3 grid(static_cast<unsigned>(ceil_div(x.m, BN)), static_cast<unsigned>(ceil_div(rows, BM)));
  siglip_bwd_p_kernel<T, P><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x.a), static_cast<const T*>(x.b), x.m, x.d, static_cast<const A*>(x.ra),
      static_cast<const A*>(x.rb), static_cast<const A*>(x.scale), static_cast<const A*>(bias), positives, row0,
      row0 + rows, static_cast<const A*>(g_row), static_cast<P*>(p), static_cast<A*>(part));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_similarity(const Operands& x, void* out, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const dim3 grid(static_cast<unsigned>(ceil_div(x.m, BN)), static_cast<unsigned>(ceil_div(x.n, BM)));
  similarity_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x.a), static_cast<const T*>(x.b), x.n, x.m, x.d, static_cast<const A*>(x.ra),
      static_cast<const A*>(x.rb), static_cast<const A*>(x.scale), static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t lse_fwd_band(const Operands& x, const Rules& rules, int64_t row0, int64_t rows, void* row_lse,
                         void* part_max, void* part_sum, cudaStream_t stream) {
  switch (x.dtype) {
    case DType::kHalf: return launch_fwd<__half>(x, rules, row0, rows, row_lse, part_max, part_sum, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(x, rules, row0, rows, row_lse, part_max, part_sum, stream);
    case DType::kFloat: return launch_fwd<float>(x, rules, row0, rows, row_lse, part_max, part_sum, stream);
    case DType::kDouble: return launch_fwd<double>(x, rules, row0, rows, row_lse, part_max, part_sum, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t merge_col_stats(DType compute, const void* part_max, const void* part_sum, int64_t parts,
                            int64_t m, void* col_max, void* col_sum, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(ceil_div(m, 256));
  if (compute == DType::kDouble) {
    merge_col_stats_kernel<double><<<grid, 256, 0, stream>>>(
        static_cast<const double*>(part_max), static_cast<const double*>(part_sum), parts, m,
        static_cast<double*>(col_max), static_cast<double*>(col_sum));
  } else {
    merge_col_stats_kernel<float><<<grid, 256, 0, stream>>>(
        static_cast<const float*>(part_max), static_cast<const float*>(part_sum), parts, m,
        static_cast<float*>(col_max), static_cast<float*>(col_sum));
  }
  return cudaGetLastError();
}

cudaError_t lse_bwd_band(const Operands& x, const Rules& rules, int64_t row0, int64_t rows, const void* row_lse,
                         const void* g_row, const void* col_lse, const void* g_col, void* p, DType p_dtype,
                         cudaStream_t stream) {
  const bool bf16_p = p_dtype == DType::kBFloat16;
  switch (x.dtype) {
    case DType::kHalf:
      return launch_bwd<__half, float>(x, rules, row0, rows, row_lse, g_row, col_lse, g_col, p, stream);
    case DType::kBFloat16:
      return bf16_p ? launch_bwd<__nv_bfloat16, __nv_bfloat16>(x, rules, row0, rows, row_lse, g_row, col_lse,
                                                                g_col, p, stream)
                    : launch_bwd<__nv_bfloat16, float>(x, rules, row0, rows, row_lse, g_row, col_lse, g_col, p,
                                                        stream);
    case DType::kFloat:
      return launch_bwd<float, float>(x, rules, row0, rows, row_lse, g_row, col_lse, g_col, p, stream);
    case DType::kDouble:
      return launch_bwd<double, double>(x, rules, row0, rows, row_lse, g_row, col_lse, g_col, p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t siglip_fwd(const Operands& x, const void* bias, bool positives, void* row_loss,
                       cudaStream_t stream) {
  switch (x.dtype) {
    case DType::kHalf: return launch_siglip_fwd<__half>(x, bias, positives, row_loss, stream);
    case DType::kBFloat16: return launch_siglip_fwd<__nv_bfloat16>(x, bias, positives, row_loss, stream);
    case DType::kFloat: return launch_siglip_fwd<float>(x, bias, positives, row_loss, stream);
    case DType::kDouble: return launch_siglip_fwd<double>(x, bias, positives, row_loss, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t siglip_bwd_band(const Operands& x, int64_t row0, int64_t rows, const void* bias, bool positives,
                            const void* g_row, void* p, DType p_dtype, void* part, cudaStream_t stream) {
  const bool bf16_p = p_dtype == DType::kBFloat16;
  switch (x.dtype) {
    case DType::kHalf:
      return launch_siglip_bwd<__half, float>(x, row0, rows, bias, positives, g_row, p, part, stream);
    case DType::kBFloat16:
      return bf16_p ? launch_siglip_bwd<__nv_bfloat16, __nv_bfloat16>(x, row0, rows, bias, positives, g_row, p,
                                                                       part, stream)
                    : launch_siglip_bwd<__nv_bfloat16, float>(x, row0, rows, bias, positives, g_row, p, part,
                                                               stream);
    case DType::kFloat:
      return launch_siglip_bwd<float, float>(x, row0, rows, bias, positives, g_row, p, part, stream);
    case DType::kDouble:
      return launch_siglip_bwd<double, double>(x, row0, rows, bias, positives, g_row, p, part, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t similarity_fwd(const Operands& x, void* out, cudaStream_t stream) {
  switch (x.dtype) {
    case DType::kHalf: return launch_similarity<__half>(x, out, stream);
    case DType::kBFloat16: return launch_similarity<__nv_bfloat16>(x, out, stream);
    case DType::kFloat: return launch_similarity<float>(x, out, stream);
    case DType::kDouble: return launch_similarity<double>(x, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mmkernels::cuda
