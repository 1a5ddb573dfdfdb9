// The tile kernels of tile_ops_simd.inc for AVX-512 (16 float lanes), compiled
// for that instruction set whatever the compiler flags; called only after the
// CPU was seen to support it (tile_ops.cpp).
#include "tile_ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12 flags its own _mm512_reduce_* (they start from _mm512_undefined_ps).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace mmkernels::cpu {
namespace {

struct V {
  static constexpr int size = 16;
  __m512 v;

  static __mmask16 mask(int n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u); }
  static V load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static V load_partial(const float* p, int n, float fill) {
    return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask(n), p)};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, mask(n), v); }
  static V broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static V fma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static V max(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
  static V min(V a, V b) { return {_mm512_min_ps(a.v, b.v)}; }
  static V floor(V a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)}; }
  static V pow2(V n) {
    __m512i e = _mm512_add_epi32(_mm512_cvttps_epi32(n.v), _mm512_set1_epi32(127));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(e, 23))};
  }
  static V select_lt(V x, V c, V a, V b) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, c.v, _CMP_LT_OQ), b.v, a.v)};
  }
  static V select_eq(V x, V c, V a, V b) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, c.v, _CMP_EQ_OQ), b.v, a.v)};
  }
  static V iota() { return {_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)}; }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
};

// Free functions, not in-class friends: GCC applies the target pragma to these.
inline V operator+(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V operator-(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V operator/(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }

#include "tile_ops_simd.inc"

// Constant-initialized: taking the addresses runs no AVX-512 code.
const TileOps<float> kOps = {&fold_stats<V>,  &softmax_grad<V>, &fold_stats_masked<V>, &softmax_grad_masked<V>,
                             &siglip_loss<V>, &siglip_grad<V>,  "avx512"};

}  // namespace
}  // namespace mmkernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace mmkernels::cpu {
SimdVariant avx512_tile_ops() { return {true, kOps}; }
}  // namespace mmkernels::cpu

#else  // not x86-64 with GCC or clang: only the portable kernels

namespace mmkernels::cpu {
SimdVariant avx512_tile_ops() { return {false, {}}; }
}  // namespace mmkernels::cpu

#endif
