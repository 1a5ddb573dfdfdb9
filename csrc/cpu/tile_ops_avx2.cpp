// The tile kernels of tile_ops_simd.inc for AVX2 + FMA (8 float lanes),
// compiled for those instruction sets whatever the compiler flags; called only
// after the CPU was seen to support them (tile_ops.cpp).
#include "tile_ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace mmkernels::cpu {
namespace {

struct V {
  static constexpr int size = 8;
  __m256 v;

  // All-ones in the lanes below n.
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static V load_partial(const float* p, int n, float fill) {
    const __m256i m = mask(n);
    return {_mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store_partial(float* p, int n) const { _mm256_maskstore_ps(p, mask(n), v); }
  static V broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static V fma(V a, V b, V c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static V max(V a, V b) { return {_mm256_max_ps(a.v, b.v)}; }
  static V min(V a, V b) { return {_mm256_min_ps(a.v, b.v)}; }
  static V floor(V a) { return {_mm256_floor_ps(a.v)}; }
  static V pow2(V n) {
    __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(n.v), _mm256_set1_epi32(127));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(e, 23))};
  }
  static V select_lt(V x, V c, V a, V b) {
    return {_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(x.v, c.v, _CMP_LT_OQ))};
  }
  static V select_eq(V x, V c, V a, V b) {
    return {_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(x.v, c.v, _CMP_EQ_OQ))};
  }
  static V iota() { return {_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7)}; }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
};

// Free functions, not in-class friends: GCC applies the target pragma to these.
inline V operator+(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V operator-(V a, V b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline V operator/(V a, V b) { return {_mm256_div_ps(a.v, b.v)}; }

#include "tile_ops_simd.inc"

// Constant-initialized: taking the addresses runs no AVX2 code.
const TileOps<float> kOps = {&fold_stats<V>,  &softmax_grad<V>, &fold_stats_masked<V>, &softmax_grad_masked<V>,
                             &siglip_loss<V>, &siglip_grad<V>,  "avx2"};

}  // namespace
}  // namespace mmkernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mmkernels::cpu {
SimdVariant avx2_tile_ops() { return {true, kOps}; }
}  // namespace mmkernels::cpu

#else  // not x86-64 with GCC or clang: only the portable kernels

namespace mmkernels::cpu {
SimdVariant avx2_tile_ops() { return {false, {}}; }
}  // namespace mmkernels::cpu

#endif
