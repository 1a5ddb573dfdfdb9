#include "common.h"

#include <ATen/ATen.h>

namespace mmkernels {

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_pair(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": a and b must be 2-D (rows, D), got shapes ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a and b must have the same D, got shapes ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.size(0) > 0 && b.size(0) > 0 && a.size(1) > 0, op,
              ": a and b must be non-empty, got shapes ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()) && a.scalar_type() == b.scalar_type(), op,
              ": a and b must share a floating dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": a and b must be on one device, got ", a.device(),
              " and ", b.device());
  TORCH_CHECK(scale.numel() == 1 && scale.device() == a.device(), op,
              ": scale must be a one-element tensor on ", a.device(), ", got shape ", scale.sizes(),
              " on ", scale.device());
}

void check_scalar(const char* op, const char* name, const at::Tensor& t, const at::Tensor& a) {
  TORCH_CHECK(t.numel() == 1 && t.device() == a.device(), op, ": ", name, " must be a one-element tensor on ",
              a.device(), ", got shape ", t.sizes(), " on ", t.device());
}

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                  const at::Tensor& a) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == numel && t.device() == a.device(), op, ": ", name,
              " must have shape (", numel, ") on ", a.device(), ", got shape ", t.sizes(), " on ",
              t.device());
}

at::Tensor inv_norms(const at::Tensor& x) {
  // Same operations as mmkernels/ops/_common.py, so every backend normalizes alike.
  return at::linalg_vector_norm(x, 2, {1}, false, compute_dtype(x.scalar_type()))
      .clamp_min(kNormEps)
      .reciprocal();
}

at::Tensor scaled_operand(const at::Tensor& x, bool normalize, at::ScalarType dtype) {
  at::Tensor out = x.to(compute_dtype(x.scalar_type()));
  if (normalize) out = out * inv_norms(x).unsqueeze(1);
  return out.to(dtype).contiguous();
}

}  // namespace mmkernels
