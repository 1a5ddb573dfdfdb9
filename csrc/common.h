// What the CPU and CUDA kernels share: the argument checks of the ops (for
// callers that bypass the Python API, which validates first) and the operands
// in the compute dtype. Maths and notation: mmkernels/ops/logsumexp.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace mmkernels {

// F.normalize's eps: rows with a smaller norm are divided by it instead.
constexpr double kNormEps = 1e-12;

// Accumulation and output dtype for features of `dtype`: fp64 stays fp64, else fp32.
at::ScalarType compute_dtype(at::ScalarType dtype);

// Argument checks, one per op, shared by the CPU and CUDA kernels (what one
// device adds, such as a grid limit, stays with its kernels). Every op takes
// a (N, D) and b (M, D): floating, same dtype, device and D, non-empty; scale:
// one element on their device. Messages name the op and the argument.
void check_lse_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale);
// row_lse, g_row (N,) and col_lse, g_col (M,) on a's device.
void check_lse_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& row_lse,
                   const at::Tensor& col_lse, const at::Tensor& g_row, const at::Tensor& g_col);
// bias: one element on a's device.
void check_siglip_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias);
// bias as the forward's; g_row (N,) on a's device.
void check_siglip_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
                      const at::Tensor& g_row);
// The exclusion rules of the masked primitive (mmkernels/ops/masked_logsumexp.py):
// positives (N,) int64; row_groups (N,) and col_groups (M,) int64, both or
// neither; row_threshold (N,) and col_threshold (M,) in the compute dtype; all
// contiguous on a's device.
struct Exclusions {
  bool exclude_diagonal;
  const at::Tensor& positives;
  const std::optional<at::Tensor>& row_groups;
  const std::optional<at::Tensor>& col_groups;
  const std::optional<at::Tensor>& row_threshold;
  const std::optional<at::Tensor>& col_threshold;
};
void check_masked_lse_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                          const Exclusions& rules);
// Adds the backward's statistics and upstream gradients, as check_lse_bwd.
void check_masked_lse_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                          const Exclusions& rules, const at::Tensor& row_lse, const at::Tensor& col_lse,
                          const at::Tensor& g_row, const at::Tensor& g_col);

// The masked ops as registered (their schema in csrc/ops.cpp), written once for
// every device: they pack the rules, check them, count the backward's products
// and call the device's implementation. A device registers
// masked_lse_fwd_op<its fwd> and masked_lse_bwd_op<its bwd>.
using OptionalTensor = std::optional<at::Tensor>;
using MaskedFwd = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& a, const at::Tensor& b,
                                                         const at::Tensor& scale, bool normalize,
                                                         const Exclusions& rules);
using MaskedBwd = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& a, const at::Tensor& b,
                                                         const at::Tensor& scale, bool normalize,
                                                         const Exclusions& rules, const at::Tensor& row_lse,
                                                         const at::Tensor& col_lse, const at::Tensor& g_row,
                                                         const at::Tensor& g_col, bool compute_pb, bool compute_pa);

void count_products(bool s, bool pb, bool pa);

template <MaskedFwd fwd>
std::tuple<at::Tensor, at::Tensor> masked_lse_fwd_op(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                                                     bool normalize, bool exclude_diagonal, const at::Tensor& positives,
                                                     const OptionalTensor& row_groups, const OptionalTensor& col_groups,
                                                     const OptionalTensor& row_threshold,
                                                     const OptionalTensor& col_threshold) {
  const Exclusions rules{exclude_diagonal, positives, row_groups, col_groups, row_threshold, col_threshold};
  check_masked_lse_fwd(a, b, scale, rules);
  return fwd(a, b, scale, normalize, rules);
}

template <MaskedBwd bwd>
std::tuple<at::Tensor, at::Tensor> masked_lse_bwd_op(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, bool normalize, bool exclude_diagonal,
    const at::Tensor& positives, const OptionalTensor& row_groups, const OptionalTensor& col_groups,
    const OptionalTensor& row_threshold, const OptionalTensor& col_threshold, const at::Tensor& row_lse,
    const at::Tensor& col_lse, const at::Tensor& g_row, const at::Tensor& g_col, bool compute_pb, bool compute_pa) {
  const Exclusions rules{exclude_diagonal, positives, row_groups, col_groups, row_threshold, col_threshold};
  check_masked_lse_bwd(a, b, scale, rules, row_lse, col_lse, g_row, g_col);
  count_products(compute_pb || compute_pa, compute_pb, compute_pa);
  return bwd(a, b, scale, normalize, rules, row_lse, col_lse, g_row, g_col, compute_pb, compute_pa);
}

// The N x M x D products the masked backward kernels computed, counted per call
// on the host: {S, pb, pa} (count_products above). How a test sees that a
// frozen side costs no product.
std::array<int64_t, 3> products_computed();

void check_similarity_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale);
// grad: (N, M).
void check_similarity_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                          const at::Tensor& grad);

// 1 / max(||x_i||, eps) per row, in the compute dtype.
at::Tensor inv_norms(const at::Tensor& x);

// x (normalized when asked) as a contiguous tensor of dtype `dtype`.
at::Tensor scaled_operand(const at::Tensor& x, bool normalize, at::ScalarType dtype);

}  // namespace mmkernels
