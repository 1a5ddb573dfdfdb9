#include "common.h"

#include <ATen/ATen.h>

#include <atomic>

namespace mmkernels {

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// a (N, D) and b (M, D): floating, same dtype, device and D; scale: one element.
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

// `t` (SigLIP's bias) is one element on a's device.
void check_scalar(const char* op, const char* name, const at::Tensor& t, const at::Tensor& a) {
  TORCH_CHECK(t.numel() == 1 && t.device() == a.device(), op, ": ", name, " must be a one-element tensor on ",
              a.device(), ", got shape ", t.sizes(), " on ", t.device());
}

// `t` has `numel` elements, on a's device (per-row statistics and gradients).
void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                  const at::Tensor& a) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == numel && t.device() == a.device(), op, ": ", name,
              " must have shape (", numel, ") on ", a.device(), ", got shape ", t.sizes(), " on ",
              t.device());
}

// The backward's inputs of size N (row_lse, g_row) and M (col_lse, g_col).
void check_statistics(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_lse,
                      const at::Tensor& col_lse, const at::Tensor& g_row, const at::Tensor& g_col) {
  check_vector(op, "row_lse", row_lse, a.size(0), a);
  check_vector(op, "col_lse", col_lse, b.size(0), a);
  check_vector(op, "g_row", g_row, a.size(0), a);
  check_vector(op, "g_col", g_col, b.size(0), a);
}

// An optional rule tensor: `numel` elements of `dtype`, contiguous, on a's device.
void check_rule(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t numel,
                at::ScalarType dtype, const at::Tensor& a) {
  if (!t.has_value()) return;
  check_vector(op, name, *t, numel, a);
  TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous(), op, ": ", name, " must be a contiguous ",
              dtype, " tensor, got ", t->scalar_type());
}

void check_exclusions(const char* op, const at::Tensor& a, const at::Tensor& b, const Exclusions& rules) {
  const int64_t n = a.size(0), m = b.size(0);
  const at::ScalarType dtype = compute_dtype(a.scalar_type());
  check_rule(op, "positives", rules.positives, n, at::kLong, a);
  TORCH_CHECK(rules.row_groups.has_value() == rules.col_groups.has_value(), op,
              ": row_groups and col_groups go together");
  check_rule(op, "row_groups", rules.row_groups, n, at::kLong, a);
  check_rule(op, "col_groups", rules.col_groups, m, at::kLong, a);
  check_rule(op, "row_threshold", rules.row_threshold, n, dtype, a);
  check_rule(op, "col_threshold", rules.col_threshold, m, dtype, a);
}

std::atomic<int64_t> g_products[3];

}  // namespace

void check_masked_lse_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                          const Exclusions& rules) {
  const char* op = "compiled_masked_lse_fwd";
  check_pair(op, a, b, scale);
  check_exclusions(op, a, b, rules);
}

void check_masked_lse_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                          const Exclusions& rules, const at::Tensor& row_lse, const at::Tensor& col_lse,
                          const at::Tensor& g_row, const at::Tensor& g_col) {
  const char* op = "compiled_masked_lse_bwd";
  check_pair(op, a, b, scale);
  check_exclusions(op, a, b, rules);
  check_statistics(op, a, b, row_lse, col_lse, g_row, g_col);
}

void count_products(bool s, bool pb, bool pa) {
  g_products[0] += s;
  g_products[1] += pb;
  g_products[2] += pa;
}

std::array<int64_t, 3> products_computed() {
  return {g_products[0].load(), g_products[1].load(), g_products[2].load()};
}

void check_lse_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale) {
  check_pair("compiled_lse_fwd", a, b, scale);
}

void check_lse_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& row_lse,
                   const at::Tensor& col_lse, const at::Tensor& g_row, const at::Tensor& g_col) {
  const char* op = "compiled_lse_bwd";
  check_pair(op, a, b, scale);
  check_statistics(op, a, b, row_lse, col_lse, g_row, g_col);
}

void check_siglip_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias) {
  const char* op = "compiled_siglip_fwd";
  check_pair(op, a, b, scale);
  check_scalar(op, "bias", bias, a);
}

void check_siglip_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
                      const at::Tensor& g_row) {
  const char* op = "compiled_siglip_bwd";
  check_pair(op, a, b, scale);
  check_scalar(op, "bias", bias, a);
  check_vector(op, "g_row", g_row, a.size(0), a);
}

void check_similarity_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale) {
  check_pair("compiled_similarity_fwd", a, b, scale);
}

void check_similarity_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                          const at::Tensor& grad) {
  check_pair("compiled_similarity_bwd", a, b, scale);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == a.size(0) && grad.size(1) == b.size(0),
              "compiled_similarity_bwd: grad must have shape (", a.size(0), ", ", b.size(0), "), got ",
              grad.sizes());
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
