// Host side of the CUDA kernels (kernels.cu): operand preparation, the band
// loop, the cuBLAS products, and registration for the CUDA dispatch key.
//
// Forward: per band of rows, lse_fwd_band (row statistics complete, column
// statistics per 64-row block) then merge_col_stats: S is computed once.
// Backward: per band of rows, lse_bwd_band writes P (band x M, about 256 MiB), then
// pb[band] = P @ Bh and pa += P^T @ Ah[band] with cuBLAS (at::mm): S is
// recomputed once, 4 GEMM-equivalents in all, extra memory one band of P.
// The masked primitive: the same kernels with its rules on (launch.h's Rules),
// and a frozen side's product skipped (3 GEMM-equivalents).
// SigLIP: the forward sums each row's losses in one pass over S (no scratch);
// the backward is the primitive's, with P from siglip_bwd_band and p_row from
// its per-tile row sums. Band lengths, scratch sizes and the order of the
// bands' kernels and products: bands.h (shared with the CPU emulation lane).
// Everything runs on the current CUDA stream of the inputs' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <limits>

#include "../common.h"
#include "../register_ops.h"
#include "bands.h"
#include "launch.h"

namespace mmkernels::cuda {
namespace {

using at::Tensor;

// torch >= 2.8 multiplies fp16/bf16 matrices into fp32 outputs on CUDA (mm's
// out_dtype); before that, fp16/bf16 products go through fp32 copies. A macro
// as well as a constant: older torch lacks that mm overload, so its call must
// not be compiled there.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define MMKERNELS_HALF_GEMM_TO_FLOAT 1
#else
#define MMKERNELS_HALF_GEMM_TO_FLOAT 0
#endif
constexpr bool kHalfGemmToFloat = MMKERNELS_HALF_GEMM_TO_FLOAT;

std::atomic<int64_t> g_band_rows{0};

DType dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default: TORCH_CHECK(false, "mmkernels CUDA kernels: unsupported dtype ", type);
  }
}

// Rows per band when each row of the band costs `bytes_per_row` of scratch.
int64_t rows_per_band(int64_t n, int64_t bytes_per_row) { return band_rows(n, bytes_per_row, g_band_rows.load()); }

// The operands as the kernels take them; the tensors keep the pointers alive.
struct Prepared {
  Tensor a, b, ra, rb, scale;
  Operands x;
};

Prepared prepare(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize) {
  const auto type = a.scalar_type();
  if (type == at::kHalf || type == at::kBFloat16) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.get_device()));
    TORCH_CHECK(major >= 8, "mmkernels cuda backend: ", type,
                " inputs need a GPU of compute capability 8.0 or newer (tensor-core tiles)");
  }
  const auto compute = compute_dtype(type);
  Prepared p;
  p.a = a.contiguous();
  p.b = b.contiguous();
  if (normalize) {
    p.ra = inv_norms(a).contiguous();
    p.rb = inv_norms(b).contiguous();
  }
  p.scale = scale.reshape({}).to(compute).contiguous();
  p.x = Operands{dtype_of(type), p.a.data_ptr(), p.b.data_ptr(), a.size(0), b.size(0), a.size(1),
                 normalize ? p.ra.data_ptr() : nullptr, normalize ? p.rb.data_ptr() : nullptr,
                 p.scale.data_ptr()};
  return p;
}

// out (= or +=) m1 @ m2, with out in the compute dtype and m1, m2 in `out`'s
// dtype or (torch >= 2.8) fp16/bf16.
void gemm_into(Tensor out, const Tensor& m1, const Tensor& m2, bool accumulate) {
  if (m1.scalar_type() == out.scalar_type()) {
    at::addmm_out(out, out, m1, m2, /*beta=*/accumulate ? 1 : 0, /*alpha=*/1);
    return;
  }
#if MMKERNELS_HALF_GEMM_TO_FLOAT
  if (accumulate) {
    out.add_(at::mm(m1, m2, out.scalar_type()));
  } else {
    at::mm_out(out, m1, m2, out.scalar_type());
  }
#else
  TORCH_CHECK(false, "mmkernels: fp16/bf16 products into fp32 need torch >= 2.8");
#endif
}

// The backward's products, one band of rows at a time: write_p(r0, rows, p,
// p_dtype) fills rows [r0, r0 + rows) of P into p (rows, m), then
// pb[band] = P @ Bh and pa += P^T @ Ah[band], each only when asked for (a
// product not asked for, and its operand, are never computed: an empty (0,)
// tensor). P and the operands of its products are bf16 for bf16 inputs
// (tensor cores, fp32 accumulation and output; bf16 has fp32's range, so
// small P entries do not flush), else the compute dtype. `scratch_per_row`:
// bytes write_p needs besides a row of P.
template <typename WriteP>
std::tuple<Tensor, Tensor> backward_bands(const Tensor& a, const Tensor& b, bool normalize,
                                          int64_t scratch_per_row, WriteP&& write_p, Products asked = {}) {
  const int64_t n = a.size(0), m = b.size(0), d = a.size(1);
  const auto compute = compute_dtype(a.scalar_type());
  const auto opts = a.options().dtype(compute);
  auto product = [&](bool on, int64_t rows) { return on ? at::empty({rows, d}, opts) : at::empty({0}, opts); };
  Tensor pb = product(asked.pb, n), pa = product(asked.pa, m);
  if (!asked.pb && !asked.pa) return {pb, pa};
  const auto p_type = (a.scalar_type() == at::kBFloat16 && kHalfGemmToFloat) ? at::kBFloat16 : compute;
  const Tensor ah = asked.pa ? scaled_operand(a, normalize, p_type) : Tensor();
  const Tensor bh = asked.pb ? scaled_operand(b, normalize, p_type) : Tensor();
  const int64_t band = rows_per_band(n, m * at::elementSize(p_type) + scratch_per_row);
  Tensor pband = at::empty({band, m}, a.options().dtype(p_type));
  backward_band_loop(
      n, band, asked, [&](int64_t r0, int64_t rows) { write_p(r0, rows, pband.data_ptr(), dtype_of(p_type)); },
      [&](int64_t r0, int64_t rows) {
        gemm_into(pb.narrow(0, r0, rows), pband.narrow(0, 0, rows), bh, /*accumulate=*/false);
      },
      [&](int64_t r0, int64_t rows, bool accumulate) {
        gemm_into(pa, pband.narrow(0, 0, rows).t(), ah.narrow(0, r0, rows), accumulate);
      });
  return {pb, pa};
}

// The masked primitive's rules as the kernels take them: the data of the
// caller's (checked, contiguous) tensors, null for a rule that is off.
Rules rules_of(const Exclusions& e) {
  auto data = [](const std::optional<Tensor>& t) -> const void* { return t.has_value() ? t->data_ptr() : nullptr; };
  return Rules{e.exclude_diagonal,
               e.positives.data_ptr<int64_t>(),
               static_cast<const int64_t*>(data(e.row_groups)),
               static_cast<const int64_t*>(data(e.col_groups)),
               data(e.row_threshold),
               data(e.col_threshold)};
}

// The forward of the primitive, with `rules` (none: the unmasked one); arguments checked.
std::tuple<Tensor, Tensor> forward(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize,
                                   const Rules& rules) {
  const c10::cuda::CUDAGuard guard(a.device());
  const Prepared p = prepare(a, b, scale, normalize);
  const int64_t n = a.size(0), m = b.size(0);
  const auto compute = compute_dtype(a.scalar_type());
  const auto opts = a.options().dtype(compute);
  Tensor row_lse = at::empty({n}, opts);
  Tensor col_max = at::full({m}, -std::numeric_limits<double>::infinity(), opts);
  Tensor col_sum = at::zeros({m}, opts);
  const int64_t band = rows_per_band(n, fwd_bytes_per_row(m, dtype_of(compute)));
  Tensor part_max = at::empty({fwd_part_rows(band), m}, opts);
  Tensor part_sum = at::empty_like(part_max);
  C10_CUDA_CHECK(lse_fwd_bands(p.x, rules, band, row_lse.data_ptr(), part_max.data_ptr(), part_sum.data_ptr(),
                               col_max.data_ptr(), col_sum.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  // An all-excluded column: max -inf, sum 0, so -inf + log(0) = -inf (not NaN).
  return {row_lse, col_max + col_sum.log()};
}

// The backward of the primitive, with `rules`, the products asked for; arguments checked.
std::tuple<Tensor, Tensor> backward(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize,
                                    const Rules& rules, const Tensor& row_lse, const Tensor& col_lse,
                                    const Tensor& g_row, const Tensor& g_col, bool compute_pb, bool compute_pa) {
  const c10::cuda::CUDAGuard guard(a.device());
  const Prepared p = prepare(a, b, scale, normalize);
  const auto compute = compute_dtype(a.scalar_type());
  auto vec = [&](const Tensor& t) { return t.to(compute).contiguous(); };
  const Tensor rl = vec(row_lse), cl = vec(col_lse), gr = vec(g_row), gc = vec(g_col);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return backward_bands(
      a, b, normalize, 0,
      [&](int64_t r0, int64_t rows, void* pband, DType p_dtype) {
        C10_CUDA_CHECK(lse_bwd_band(p.x, rules, r0, rows, rl.data_ptr(), gr.data_ptr(), cl.data_ptr(),
                                    gc.data_ptr(), pband, p_dtype, stream));
      },
      Products{compute_pb, compute_pa});
}

std::tuple<Tensor, Tensor> lse_fwd(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize) {
  check_lse_fwd(a, b, scale);
  return forward(a, b, scale, normalize, Rules{});
}

std::tuple<Tensor, Tensor> lse_bwd(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize,
                                   const Tensor& row_lse, const Tensor& col_lse, const Tensor& g_row,
                                   const Tensor& g_col) {
  check_lse_bwd(a, b, scale, row_lse, col_lse, g_row, g_col);
  return backward(a, b, scale, normalize, Rules{}, row_lse, col_lse, g_row, g_col, true, true);
}

std::tuple<Tensor, Tensor> masked_lse_fwd(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize,
                                          const Exclusions& rules) {
  return forward(a, b, scale, normalize, rules_of(rules));
}

std::tuple<Tensor, Tensor> masked_lse_bwd(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize,
                                          const Exclusions& rules, const Tensor& row_lse, const Tensor& col_lse,
                                          const Tensor& g_row, const Tensor& g_col, bool compute_pb, bool compute_pa) {
  return backward(a, b, scale, normalize, rules_of(rules), row_lse, col_lse, g_row, g_col, compute_pb, compute_pa);
}

Tensor siglip_fwd_op(const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias, bool normalize,
                     bool positives_on_diagonal) {
  check_siglip_fwd(a, b, scale, bias);
  TORCH_CHECK(ceil_div(a.size(0), kTileRows) <= std::numeric_limits<int32_t>::max(),
              "compiled_siglip_fwd: too many rows of a (", a.size(0), ") for one grid");
  const c10::cuda::CUDAGuard guard(a.device());
  const Prepared p = prepare(a, b, scale, normalize);
  const auto compute = compute_dtype(a.scalar_type());
  const Tensor shift = bias.reshape({}).to(compute).contiguous();
  Tensor row = at::empty({a.size(0)}, a.options().dtype(compute));
  C10_CUDA_CHECK(siglip_fwd(p.x, shift.data_ptr(), positives_on_diagonal, row.data_ptr(),
                            c10::cuda::getCurrentCUDAStream()));
  return row;
}

std::tuple<Tensor, Tensor, Tensor> siglip_bwd_op(const Tensor& a, const Tensor& b, const Tensor& scale,
                                                 const Tensor& bias, bool normalize, bool positives_on_diagonal,
                                                 const Tensor& g_row) {
  check_siglip_bwd(a, b, scale, bias, g_row);
  const c10::cuda::CUDAGuard guard(a.device());
  const Prepared p = prepare(a, b, scale, normalize);
  const int64_t n = a.size(0), m = b.size(0);
  const auto compute = compute_dtype(a.scalar_type());
  const Tensor shift = bias.reshape({}).to(compute).contiguous();
  const Tensor gr = g_row.to(compute).contiguous();
  Tensor p_row = at::empty({n}, a.options().dtype(compute));
  // A band's row sums of P per 64 columns, in the compute dtype (P itself may
  // be bf16); allocated for the first band, the longest.
  const int64_t col_blocks = siglip_col_blocks(m);
  Tensor part;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto [pb, pa] = backward_bands(
      a, b, normalize, col_blocks * at::elementSize(compute),
      [&](int64_t r0, int64_t rows, void* pband, DType p_dtype) {
        if (!part.defined()) part = at::empty({rows, col_blocks}, a.options().dtype(compute));
        C10_CUDA_CHECK(siglip_bwd_band(p.x, r0, rows, shift.data_ptr(), positives_on_diagonal, gr.data_ptr(),
                                       pband, p_dtype, part.data_ptr(), stream));
        p_row.narrow(0, r0, rows).copy_(part.narrow(0, 0, rows).sum(1));
      });
  return {pb, pa, p_row};
}

Tensor similarity_fwd_op(const Tensor& a, const Tensor& b, const Tensor& scale) {
  check_similarity_fwd(a, b, scale);
  TORCH_CHECK(ceil_div(a.size(0), kTileRows) <= kMaxGridY, "compiled_similarity_fwd: at most ",
              kMaxGridY * kTileRows, " rows of a on CUDA, got ", a.size(0));
  const c10::cuda::CUDAGuard guard(a.device());
  const Prepared p = prepare(a, b, scale, /*normalize=*/true);
  Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
  C10_CUDA_CHECK(similarity_fwd(p.x, out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<Tensor, Tensor> similarity_bwd_op(const Tensor& a, const Tensor& b, const Tensor& scale,
                                             const Tensor& grad) {
  check_similarity_bwd(a, b, scale, grad);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto compute = compute_dtype(a.scalar_type());
  // fp16/bf16: the upstream gradient multiplies the normalized operands in its
  // own dtype, accumulating into fp32 (torch >= 2.8).
  const auto g_type = (grad.scalar_type() != compute && kHalfGemmToFloat) ? grad.scalar_type() : compute;
  const Tensor g = grad.to(g_type).contiguous();
  const Tensor ah = scaled_operand(a, true, g_type), bh = scaled_operand(b, true, g_type);
  Tensor pb = at::empty({a.size(0), a.size(1)}, a.options().dtype(compute));
  Tensor pa = at::empty({b.size(0), b.size(1)}, a.options().dtype(compute));
  gemm_into(pb, g, bh, /*accumulate=*/false);
  gemm_into(pa, g.t(), ah, /*accumulate=*/false);
  return {pb, pa};
}

}  // namespace

int64_t set_band_rows(int64_t rows) { return g_band_rows.exchange(rows); }

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  register_compiled_ops<&lse_fwd, &lse_bwd, &masked_lse_fwd, &masked_lse_bwd, &siglip_fwd_op, &siglip_bwd_op,
                        &similarity_fwd_op, &similarity_bwd_op>(m);
}

}  // namespace mmkernels::cuda
