// What the CPU and CUDA kernels share: the argument checks of the ops (for
// callers that bypass the Python API, which validates first) and the operands
// in the compute dtype. Maths and notation: mmkernels/ops/logsumexp.py.
#pragma once

#include <ATen/core/Tensor.h>

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
void check_similarity_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale);
// grad: (N, M).
void check_similarity_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                          const at::Tensor& grad);

// 1 / max(||x_i||, eps) per row, in the compute dtype.
at::Tensor inv_norms(const at::Tensor& x);

// x (normalized when asked) as a contiguous tensor of dtype `dtype`.
at::Tensor scaled_operand(const at::Tensor& x, bool normalize, at::ScalarType dtype);

}  // namespace mmkernels
