// nvcuda::wmma on the CPU (emu.h), with the rules of the CUDA programming
// guide checked: compile-time for shapes, uses, layouts and element types,
// at run time for pointers (256-bit aligned) and ldm (a multiple of 16 bytes).
//
// Every lane of a warp holds the whole fragment's inputs, and the
// accumulator elements it owns (element e belongs to lane e % 32): mma_sync
// computes, and store_matrix_sync writes, only those, so the lanes of a warp
// write disjoint addresses as on the hardware. Products are exact in fp32
// (fp16 x fp16 and bf16 x bf16 are) and accumulate in fp32 in k order; the
// tensor cores' own summation order and rounding are not modelled.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "emu_runtime.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename T>
constexpr bool is_16bit_input = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <int M, int N, int K>
constexpr bool is_16bit_shape = (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
                                (M == 8 && N == 32 && K == 16);

inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float to_float(float x) { return x; }

// Rows and columns of the matrix a fragment holds.
template <typename Use, int M, int N, int K> struct Extent;
template <int M, int N, int K> struct Extent<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct Extent<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct Extent<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename T>
void check_pointer_and_ldm(const char* call, const T* ptr, unsigned ldm, int leading, int line) {
  if (ptr == nullptr) mmk_emu::fail("%s: null pointer (line %d)", call, line);
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    mmk_emu::fail("%s: pointer %p is not 256-bit aligned (line %d)", call, static_cast<const void*>(ptr), line);
  if (ldm * sizeof(T) % 16 != 0)
    mmk_emu::fail("%s: ldm %u elements of %zu bytes is not a multiple of 16 bytes (line %d)", call, ldm, sizeof(T),
                  line);
  if (ldm < static_cast<unsigned>(leading))
    mmk_emu::fail("%s: ldm %u is shorter than the fragment's %d elements: rows would overlap (line %d)", call, ldm,
                  leading, line);
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(detail::is_16bit_shape<M, N, K>,
                "wmma (emulated): only the fp16/bf16 shapes m16n16k16, m32n8k16 and m8n32k16 are modelled");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_void_v<Layout>
                                                 : std::is_same_v<Layout, row_major> ||
                                                       std::is_same_v<Layout, col_major>,
                "wmma: matrix_a/matrix_b fragments take row_major or col_major, accumulators no layout");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float> : detail::is_16bit_input<T>,
                "wmma (emulated): matrix_a/matrix_b of __half or __nv_bfloat16, accumulators of float");

 public:
  using element_type = T;
  static constexpr int rows = detail::Extent<Use, M, N, K>::rows;
  static constexpr int cols = detail::Extent<Use, M, N, K>::cols;
  T at[rows * cols];  // row-major, whatever the memory layout it was loaded from
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& value, int line = __builtin_LINE()) {
  mmk_emu::warp_sync(line);
  for (auto& x : f.at) x = static_cast<T>(value);
}

// matrix_a / matrix_b: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* ptr, unsigned ldm, int line = __builtin_LINE()) {
  static_assert(!std::is_same_v<Use, accumulator>, "wmma: loading an accumulator takes a layout_t");
  static_assert(std::is_same_v<P, T>, "wmma: the pointer's element type must be the fragment's");
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool row = std::is_same_v<Layout, row_major>;
  detail::check_pointer_and_ldm("load_matrix_sync", ptr, ldm, row ? F::cols : F::rows, line);
  mmk_emu::warp_sync(line);
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.at[r * F::cols + c] = row ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <int M, int N, int K, typename P>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const P* ptr, unsigned ldm, layout_t layout,
                      int line = __builtin_LINE()) {
  static_assert(std::is_same_v<P, float>, "wmma: the pointer's element type must be the fragment's");
  const bool row = layout == mem_row_major;
  detail::check_pointer_and_ldm("load_matrix_sync", ptr, ldm, row ? N : M, line);
  mmk_emu::warp_sync(line);
  for (int e = mmk_emu::lane_id(); e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    f.at[e] = row ? ptr[r * ldm + c] : ptr[c * ldm + r];
  }
}

template <int M, int N, int K, typename P>
void store_matrix_sync(P* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout,
                       int line = __builtin_LINE()) {
  static_assert(std::is_same_v<P, float>, "wmma: the pointer's element type must be the fragment's");
  const bool row = layout == mem_row_major;
  detail::check_pointer_and_ldm("store_matrix_sync", ptr, ldm, row ? N : M, line);
  mmk_emu::warp_sync(line);
  for (int e = mmk_emu::lane_id(); e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    (row ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.at[e];
  }
}

// d = a @ b + c for this lane's accumulator elements.
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c,
              int line = __builtin_LINE()) {
  mmk_emu::warp_sync(line);
  for (int e = mmk_emu::lane_id(); e < M * N; e += 32) {
    const int r = e / N, col = e % N;
    float sum = c.at[e];
    for (int k = 0; k < K; ++k) sum += detail::to_float(a.at[r * K + k]) * detail::to_float(b.at[k * N + col]);
    d.at[e] = sum;
  }
}

}  // namespace nvcuda::wmma
