// What the CPU and CUDA kernels share: input checks of the ops (for callers
// that bypass the Python API, which validates first) and the operands in the
// compute dtype. Maths and notation: mmkernels/ops/logsumexp.py.
#pragma once

#include <ATen/core/Tensor.h>

namespace mmkernels {

// F.normalize's eps: rows with a smaller norm are divided by it instead.
constexpr double kNormEps = 1e-12;

// Accumulation and output dtype for features of `dtype`: fp64 stays fp64, else fp32.
at::ScalarType compute_dtype(at::ScalarType dtype);

// a (N, D) and b (M, D): floating, same dtype, device and D; scale: one element.
void check_pair(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale);

// `t` (SigLIP's bias) is one element on a's device.
void check_scalar(const char* op, const char* name, const at::Tensor& t, const at::Tensor& a);

// `t` has `numel` elements, on a's device (per-row statistics and gradients).
void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                  const at::Tensor& a);

// 1 / max(||x_i||, eps) per row, in the compute dtype.
at::Tensor inv_norms(const at::Tensor& x);

// x (normalized when asked) as a contiguous tensor of dtype `dtype`.
at::Tensor scaled_operand(const at::Tensor& x, bool normalize, at::ScalarType dtype);

}  // namespace mmkernels
