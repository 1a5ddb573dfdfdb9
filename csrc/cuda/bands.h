// The host logic of the CUDA ops that needs neither ATen nor cuBLAS: how long
// a band of rows is, how much scratch it takes, and in which order the bands'
// kernels and products run. ops_cuda.cpp runs it with tensors and cuBLAS; the
// CPU emulation of the kernels (tests/cuda_emulation/) runs the same code
// with a host matrix product, so a wrong band edge or merge order shows there.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../int_math.h"
#include "launch.h"

namespace mmkernels::cuda {

// Scratch budget of a band (P, or the forward's column statistics).
constexpr int64_t kBandBytes = int64_t{256} << 20;
// The backward's grid has a band's row tiles on y, which holds at most 65535 blocks.
constexpr int64_t kMaxGridY = 65535;

inline DType compute_of(DType input) { return input == DType::kDouble ? DType::kDouble : DType::kFloat; }

inline int64_t size_of(DType type) {
  switch (type) {
    case DType::kHalf:
    case DType::kBFloat16: return 2;
    case DType::kFloat: return 4;
    case DType::kDouble: return 8;
  }
  return 0;
}

// Rows per band when each row costs `bytes_per_row` of scratch: `requested`
// when positive (set_band_rows), else about kBandBytes; a multiple of the
// 64-row tile, at least one tile, at most n and what the grid holds.
inline int64_t band_rows(int64_t n, int64_t bytes_per_row, int64_t requested) {
  int64_t rows = requested > 0 ? requested : kBandBytes / std::max<int64_t>(1, bytes_per_row);
  rows = std::max<int64_t>(kTileRows, rows / kTileRows * kTileRows);
  return std::min({rows, n, kMaxGridY * kTileRows});
}

// The forward's scratch per row: its block's share of the column statistics
// (2 values per column per 64 rows), so bands are long and the grid fills the GPU.
inline int64_t fwd_bytes_per_row(int64_t m, DType compute) {
  return ceil_div(2 * m * size_of(compute), kTileRows);
}

// Rows of part_max / part_sum a forward band of `band` rows needs (each has m columns).
inline int64_t fwd_part_rows(int64_t band) { return ceil_div(band, kTileRows); }

// The whole forward: row_lse (n,) complete, and col_max / col_sum (m,), which
// enter as -inf / 0, folded over every band in band order. Returns the first error.
inline cudaError_t lse_fwd_bands(const Operands& x, const Rules& rules, int64_t band, void* row_lse,
                                 void* part_max, void* part_sum, void* col_max, void* col_sum,
                                 cudaStream_t stream) {
  for (int64_t r0 = 0; r0 < x.n; r0 += band) {
    const int64_t rows = std::min(band, x.n - r0);
    cudaError_t error = lse_fwd_band(x, rules, r0, rows, row_lse, part_max, part_sum, stream);
    if (error != cudaSuccess) return error;
    error = merge_col_stats(compute_of(x.dtype), part_max, part_sum, fwd_part_rows(rows), x.m, col_max, col_sum,
                            stream);
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

// SigLIP's backward keeps, besides a band of P, its row sums per 64 columns.
inline int64_t siglip_col_blocks(int64_t m) { return ceil_div(m, kTileCols); }

// Which of the backward's products a call asks for: both, or one for a frozen side.
struct Products {
  bool pb = true, pa = true;
};

// The backward's band loop: write_p(r0, rows) fills a band of P (rows, m);
// then pb_band(r0, rows) computes pb[r0 : r0 + rows] = P @ Bh and
// pa_band(r0, rows, accumulate) pa (+)= P^T @ Ah[r0 : r0 + rows], accumulating
// from the second band on; each only when `asked` (nothing at all for neither).
template <typename WriteP, typename PbBand, typename PaBand>
void backward_band_loop(int64_t n, int64_t band, Products asked, WriteP&& write_p, PbBand&& pb_band,
                        PaBand&& pa_band) {
  if (!asked.pb && !asked.pa) return;
  for (int64_t r0 = 0; r0 < n; r0 += band) {
    const int64_t rows = std::min(band, n - r0);
    write_p(r0, rows);
    if (asked.pb) pb_band(r0, rows);
    if (asked.pa) pa_band(r0, rows, /*accumulate=*/r0 > 0);
  }
}

}  // namespace mmkernels::cuda
