// Matrix products on bf16 operands with fp32 accumulation and fp32 results, for
// the tiles of the CPU kernels (kernels.cpp) on CPUs with AVX512-BF16
// (vdpbf16ps: 16 fp32 lanes, each += the dot product of two pairs of bf16).
//
// Why our own: ATen's bf16 matrix product (oneDNN) rounds its result to bf16,
// and a logit rounded to bf16 is off by up to 2^-8 of itself (0.4 at a logit
// of 100); ATen's bf16 x bf16 -> fp32 entry points are not exported, and MKL's
// runs no faster than fp32 on CPUs other than Intel's (measured: docs/cpu-bf16.md).
//
// Operands are 32-bit words, each a pair of bf16 that are consecutive in the
// reduction (K) dimension, in the order vdpbf16ps multiplies them:
//
//   A side  word (i, kp) = (A[i][2kp], A[i][2kp+1]) at a[i * a_row + kp * a_k]
//           (a row-major bf16 matrix with even K: a_row = ld / 2, a_k = 1;
//           pack_rows' output read transposed: a_row = 1, a_k = its ld)
//   B side  packed "kp-major": word (kp, n) = (B[2kp][n], B[2kp+1][n]) at
//           b[kp * b_ld + n], b_ld >= cols rounded up to 16, lanes past cols
//           written (pack_* write zeros there)
//
// so C[i][n] = sum over kp of the two products of word (i, kp) with word (kp, n).
// An odd K is one zero-padded pair. Plain C++ header (no torch), as tile_ops.h.
#pragma once

#include <cstdint>

namespace mmkernels::cpu {

struct Bf16Products {
  // c[i * ldc + n] = alpha * row_scale[i] * col_scale[n] * sum_kp A(i, kp) . B(kp, n)
  // (+ c[...] when accumulate), for i < rows, n < cols, kp < k2 (K / 2, pairs); a null
  // row_scale or col_scale is all ones (the factors: the inverse norms of normalize=True).
  void (*gemm)(int64_t rows, int64_t cols, int64_t k2, const uint32_t* a, int64_t a_row, int64_t a_k,
               const uint32_t* b, int64_t b_ld, float alpha, const float* row_scale, const float* col_scale,
               bool accumulate, float* c, int64_t ldc);
  // B side from a row-major (n, k) bf16 matrix used as its transpose (k, n): the
  // forward's B_j^T. k even; out: (k / 2, out_ld) words.
  void (*pack_transposed)(const uint16_t* src, int64_t n, int64_t k, int64_t ld, uint32_t* out, int64_t out_ld);
  // B side from a row-major (k, n) bf16 matrix: pairs of rows interleaved
  // (an odd last row paired with zeros). out: (ceil(k / 2), out_ld) words.
  void (*pack_rows)(const uint16_t* src, int64_t k, int64_t n, int64_t ld, uint32_t* out, int64_t out_ld);
  // The backward's P (rows, cols) fp32 rounded to bf16 (nearest even) twice: times
  // col_scale[j] row-major into `row_major` (ld cols rounded up to even, the pad column
  // zero) for P @ B_j, and times row_scale[i] as pack_rows into `pairs` (ld pairs_ld)
  // for P^T @ A_i. Null factors are ones.
  void (*round_p)(const float* p, int64_t rows, int64_t cols, int64_t ld, const float* row_scale,
                  const float* col_scale, uint16_t* row_major, uint32_t* pairs, int64_t pairs_ld);
};

// The products, or null when this binary or this CPU lacks AVX512-BF16.
const Bf16Products* avx512_bf16_products();

// MKL's cblas_gemm_bf16bf16f32 (bf16 operands, fp32 results; AMX tiles on CPUs
// with AMX-BF16), found at run time in the process (torch's x86 builds link MKL
// in), or null. Row-major CBLAS arguments; MKL_INT is int (the LP64 interface).
using MklBf16Gemm = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const void* a,
                             int lda, const void* b, int ldb, float beta, float* c, int ldc);
MklBf16Gemm mkl_bf16_gemm();
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

// The tile products bf16 inputs use, chosen once per process: "mkl" where the CPU
// has AMX-BF16 (and MKL is there), else "avx512_bf16" where it has AVX512-BF16,
// else "fp32" (the operands converted to fp32, BLAS). The environment variable
// MMKERNELS_CPU_BF16_PRODUCTS forces one (an unknown or unsupported name is an
// error at the first bf16 call).
enum class Bf16Path { kFp32 = 0, kAvx512Bf16 = 1, kMkl = 2 };
Bf16Path bf16_path();
// bf16_path()'s kernels when it is kAvx512Bf16, else null.
const Bf16Products* bf16_products();
const char* bf16_products_name();
// The names this CPU runs, best first ("fp32" always last).
const char* const* supported_bf16_products(int* count);
// Use `name` from now on (tests); false, changing nothing, if this CPU lacks it.
bool set_bf16_products(const char* name);

}  // namespace mmkernels::cpu
