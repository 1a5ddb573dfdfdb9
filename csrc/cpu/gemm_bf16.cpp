// bf16 x bf16 -> fp32 tile products with AVX512-BF16 (gemm_bf16.h), compiled
// for that instruction set whatever the compiler flags and called only after
// the CPU was seen to support it.
//
// The product is the classic register-blocked kernel: a block of 6 rows of A by
// 64 columns of B (4 vectors of 16 fp32 lanes) lives in 24 accumulators; each
// step over K loads 4 vectors of B pairs, broadcasts 6 words of A and issues 24
// vdpbf16ps (64 multiply-adds each). K is cut into slices of kSliceK pairs so
// that a 64-column slice of B (16 KiB) stays in L1 while every row block of the
// tile streams past it.
#include "gemm_bf16.h"

#include <dlfcn.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
// GCC 12 flags its own _mm512_castsi256_si512 (it starts from an undefined vector).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace mmkernels::cpu {
namespace {

constexpr int kRows = 6;        // rows of A per register block
constexpr int kVectors = 4;     // 16-column vectors of B per register block
constexpr int64_t kSliceK = 64; // pairs of K per slice: 64 columns x 64 pairs x 4 bytes = 16 KiB of B

__mmask16 lanes(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u); }

// One register block: rows x (16 * vectors) of C from pairs [0, k2) of its A rows and B columns.
template <int R, int NV>
void block(int64_t k2, const uint32_t* a, int64_t a_row, int64_t a_k, const uint32_t* b, int64_t b_ld,
           float alpha, const float* row_scale, const float* col_scale, bool accumulate, float* c, int64_t ldc,
           int64_t cols) {
  // The loops over r and v unrolled (GCC leaves them rolled at -O2, with the
  // accumulators in memory): every accumulator in a register.
  __m512 acc[R][NV];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < k2; ++kp) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + kp * b_ld + 16 * v);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_row + kp * a_k]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    const __m512 scale = _mm512_set1_ps(row_scale ? alpha * row_scale[r] : alpha);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = lanes(cols - 16 * v);
      __m512 out = _mm512_mul_ps(acc[r][v], scale);
      if (col_scale) out = _mm512_mul_ps(out, _mm512_maskz_loadu_ps(m, col_scale + 16 * v));
      if (accumulate) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(m, cr + 16 * v));
      _mm512_mask_storeu_ps(cr + 16 * v, m, out);
    }
  }
}

using BlockFn = void (*)(int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, float, const float*,
                         const float*, bool, float*, int64_t, int64_t);

template <int R>
constexpr BlockFn block_of(int nv) {
  return nv == 1 ? &block<R, 1> : nv == 2 ? &block<R, 2> : nv == 3 ? &block<R, 3> : &block<R, 4>;
}

BlockFn block_for(int rows, int nv) {
  switch (rows) {
    case 1: return block_of<1>(nv);
    case 2: return block_of<2>(nv);
    case 3: return block_of<3>(nv);
    case 4: return block_of<4>(nv);
    case 5: return block_of<5>(nv);
    default: return block_of<6>(nv);
  }
}

void gemm(int64_t rows, int64_t cols, int64_t k2, const uint32_t* a, int64_t a_row, int64_t a_k,
          const uint32_t* b, int64_t b_ld, float alpha, const float* row_scale, const float* col_scale,
          bool accumulate, float* c, int64_t ldc) {
  // Each slice's sum is scaled by the factors and added: their total is the scaled sum.
  for (int64_t k0 = 0; k0 < k2; k0 += kSliceK) {
    const int64_t kc = std::min(kSliceK, k2 - k0);
    const bool add = accumulate || k0 > 0;  // later slices add to the earlier ones
    for (int64_t n0 = 0; n0 < cols; n0 += 16 * kVectors) {
      const int64_t nc = std::min<int64_t>(16 * kVectors, cols - n0);
      const int nv = static_cast<int>((nc + 15) / 16);
      const uint32_t* b_slice = b + k0 * b_ld + n0;
      for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
        const int r = static_cast<int>(std::min<int64_t>(kRows, rows - i0));
        block_for(r, nv)(kc, a + i0 * a_row + k0 * a_k, a_row, a_k, b_slice, b_ld, alpha,
                         row_scale ? row_scale + i0 : nullptr, col_scale ? col_scale + n0 : nullptr, add,
                         c + i0 * ldc + n0, ldc, nc);
      }
    }
  }
}

// Zero the lanes [n, out_ld) of each of `k2` packed rows (the micro-kernel loads whole vectors).
void zero_tail(uint32_t* out, int64_t k2, int64_t n, int64_t out_ld) {
  if (n < out_ld)
    for (int64_t kp = 0; kp < k2; ++kp) std::memset(out + kp * out_ld + n, 0, (out_ld - n) * sizeof(uint32_t));
}

void pack_transposed(const uint16_t* src, int64_t n, int64_t k, int64_t ld, uint32_t* out, int64_t out_ld) {
  // A transpose of 32-bit words: word kp of source row j becomes word j of packed row kp.
  const int64_t k2 = k / 2;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(src + j * ld);
    for (int64_t kp = 0; kp < k2; ++kp) out[kp * out_ld + j] = row[kp];
  }
  zero_tail(out, k2, n, out_ld);
}

// Lanes of two 16-bit rows interleaved: (x0, y0, x1, y1, ...), from x in the low and y in the high half.
// An array, not a vector constant: a namespace-scope __m512i would run AVX-512 code when the library loads.
alignas(64) const uint16_t kInterleaveIndex[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

__m512i interleave(__m256i x, __m256i y) {
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(x), y, 1);
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleaveIndex), both);
}

void pack_rows(const uint16_t* src, int64_t k, int64_t n, int64_t ld, uint32_t* out, int64_t out_ld) {
  const int64_t k2 = (k + 1) / 2;
  for (int64_t kp = 0; kp < k2; ++kp) {
    const uint16_t* x = src + 2 * kp * ld;
    const uint16_t* y = 2 * kp + 1 < k ? x + ld : nullptr;
    uint32_t* o = out + kp * out_ld;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = lanes(n - j);
      const __m256i xv = _mm256_maskz_loadu_epi16(m, x + j);
      const __m256i yv = y ? _mm256_maskz_loadu_epi16(m, y + j) : _mm256_setzero_si256();
      _mm512_mask_storeu_epi32(o + j, m, interleave(xv, yv));
    }
  }
  zero_tail(out, k2, n, out_ld);
}

__m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

void round_p(const float* p, int64_t rows, int64_t cols, int64_t ld, const float* row_scale,
             const float* col_scale, uint16_t* row_major, uint32_t* pairs, int64_t pairs_ld) {
  const int64_t even = cols + (cols & 1);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < rows; i += 2) {
    const float* x = p + i * ld;
    const float* y = i + 1 < rows ? x + ld : nullptr;
    const __m512 x_factor = row_scale ? _mm512_set1_ps(row_scale[i]) : one;
    const __m512 y_factor = row_scale && y ? _mm512_set1_ps(row_scale[i + 1]) : one;
    uint32_t* o = pairs + (i / 2) * pairs_ld;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = lanes(cols - j);
      const __m512 col = col_scale ? _mm512_maskz_loadu_ps(m, col_scale + j) : one;
      const __m512 xf = _mm512_maskz_loadu_ps(m, x + j);
      const __m512 yf = y ? _mm512_maskz_loadu_ps(m, y + j) : _mm512_setzero_ps();
      _mm256_mask_storeu_epi16(row_major + i * even + j, m, to_bf16(_mm512_mul_ps(xf, col)));
      if (y) _mm256_mask_storeu_epi16(row_major + (i + 1) * even + j, m, to_bf16(_mm512_mul_ps(yf, col)));
      const __m256i xv = to_bf16(_mm512_mul_ps(xf, x_factor)), yv = to_bf16(_mm512_mul_ps(yf, y_factor));
      _mm512_mask_storeu_epi32(o + j, m, interleave(xv, yv));
    }
    if (even != cols) {  // the pad column of the row-major copy
      row_major[i * even + cols] = 0;
      if (y) row_major[(i + 1) * even + cols] = 0;
    }
  }
  zero_tail(pairs, (rows + 1) / 2, cols, pairs_ld);
}

// Constant-initialized: taking the addresses runs no AVX-512 code.
const Bf16Products kProducts = {&gemm, &pack_transposed, &pack_rows, &round_p};

}  // namespace
}  // namespace mmkernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace mmkernels::cpu {
const Bf16Products* avx512_bf16_products() {
  // __builtin_cpu_supports also checks that the OS saves the AVX-512 state.
  const bool runs = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl");
  return runs ? &kProducts : nullptr;
}
}  // namespace mmkernels::cpu

#else  // not x86-64 with GCC or clang

namespace mmkernels::cpu {
const Bf16Products* avx512_bf16_products() { return nullptr; }
}  // namespace mmkernels::cpu

#endif

// --- MKL's product and the choice, in portable code ----------------------------------

namespace mmkernels::cpu {

MklBf16Gemm mkl_bf16_gemm() {
  static const MklBf16Gemm found = [] {
    // RTLD_DEFAULT sees libtorch_cpu's exported symbols (this library links it).
    return reinterpret_cast<MklBf16Gemm>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
  }();
  return found;
}

namespace {

struct PathName {
  Bf16Path path;
  const char* name;
};
// Best first.
const PathName kPaths[] = {{Bf16Path::kMkl, "mkl"}, {Bf16Path::kAvx512Bf16, "avx512_bf16"}, {Bf16Path::kFp32, "fp32"}};

bool has_amx_bf16() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  return __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

// Linux gives a process AMX's tile data state only on request (arch_prctl
// ARCH_REQ_XCOMP_PERM, kernels >= 5.16); without it the first tile instruction
// kills the process. Requested once, before MKL may run AMX code on this CPU;
// false where refused, and then MKL's product is not used here.
bool amx_permitted() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtileData) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

bool runs(Bf16Path path) {
  switch (path) {
    case Bf16Path::kMkl: return mkl_bf16_gemm() != nullptr && (!has_amx_bf16() || amx_permitted());
    case Bf16Path::kAvx512Bf16: return avx512_bf16_products() != nullptr;
    default: return true;
  }
}

// The default: MKL only where AMX does its products (elsewhere it runs no faster
// than fp32: docs/cpu-bf16.md), else our AVX512-BF16 kernels, else fp32.
Bf16Path best() {
  if (has_amx_bf16() && runs(Bf16Path::kMkl)) return Bf16Path::kMkl;
  return runs(Bf16Path::kAvx512Bf16) ? Bf16Path::kAvx512Bf16 : Bf16Path::kFp32;
}

const PathName* path_named(const char* name) {
  for (const PathName& p : kPaths)
    if (std::strcmp(p.name, name) == 0) return &p;
  return nullptr;
}

// -1 until the first use; then a Bf16Path.
std::atomic<int> g_bf16_choice{-1};

int current_choice() {
  int choice = g_bf16_choice.load(std::memory_order_acquire);
  if (choice >= 0) return choice;
  choice = static_cast<int>(best());
  const char* forced = std::getenv("MMKERNELS_CPU_BF16_PRODUCTS");
  if (forced != nullptr && *forced != 0) {
    const PathName* hit = path_named(forced);
    if (hit == nullptr)
      throw std::invalid_argument(std::string("MMKERNELS_CPU_BF16_PRODUCTS=") + forced +
                                  ": expected mkl, avx512_bf16 or fp32");
    if (!runs(hit->path))
      throw std::invalid_argument(std::string("MMKERNELS_CPU_BF16_PRODUCTS=") + forced +
                                  ": not available on this CPU or in this torch build");
    choice = static_cast<int>(hit->path);
  }
  int unset = -1;
  g_bf16_choice.compare_exchange_strong(unset, choice);
  return g_bf16_choice.load(std::memory_order_acquire);
}

}  // namespace

Bf16Path bf16_path() { return static_cast<Bf16Path>(current_choice()); }

const Bf16Products* bf16_products() {
  return bf16_path() == Bf16Path::kAvx512Bf16 ? avx512_bf16_products() : nullptr;
}

const char* bf16_products_name() {
  const Bf16Path path = bf16_path();
  for (const PathName& p : kPaths)
    if (p.path == path) return p.name;
  return "fp32";
}

const char* const* supported_bf16_products(int* count) {
  static const char* names[3];
  static const int n = [] {
    int k = 0;
    for (const PathName& p : kPaths)
      if (runs(p.path)) names[k++] = p.name;
    return k;
  }();
  *count = n;
  return names;
}

bool set_bf16_products(const char* name) {
  const PathName* hit = path_named(name);
  if (hit == nullptr || !runs(hit->path)) return false;
  g_bf16_choice.store(static_cast<int>(hit->path), std::memory_order_release);
  return true;
}

}  // namespace mmkernels::cpu
