// The portable tile kernels (double, and float on CPUs without AVX2) and the
// choice of the float kernels at run time. Same algorithm as
// tile_ops_simd.inc, one element at a time, with std::exp and std::log1p.
#include "tile_ops.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

namespace mmkernels::cpu {
namespace {

template <typename T>
T safe_shift(T m) {  // see tile_ops_simd.inc
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

template <typename T>
void rescale_running(T* max, T* sum, T* tile_max, int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    const T m = max[k] > tile_max[k] ? max[k] : tile_max[k];
    const T shift = safe_shift(m);
    sum[k] *= std::exp(max[k] - shift);
    max[k] = m;
    tile_max[k] = shift;
  }
}

template <typename T>
void fold_stats(const T* s, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum,
                T* col_max, T* col_sum, T* work) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  T* col_shift = work;
  T* row_shift = work + cols;
  for (int64_t j = 0; j < cols; ++j) col_shift[j] = -kInf;
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * ld;
    T m = -kInf;
    for (int64_t j = 0; j < cols; ++j) {
      m = si[j] > m ? si[j] : m;
      col_shift[j] = si[j] > col_shift[j] ? si[j] : col_shift[j];
    }
    row_shift[i] = m;
  }
  rescale_running(row_max, row_sum, row_shift, rows);
  rescale_running(col_max, col_sum, col_shift, cols);
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * ld;
    T acc = 0;
    for (int64_t j = 0; j < cols; ++j) {
      acc += std::exp(si[j] - row_shift[i]);
      col_sum[j] += std::exp(si[j] - col_shift[j]);
    }
    row_sum[i] += acc;
  }
}

template <typename T>
void softmax_grad(T* s, int64_t rows, int64_t cols, int64_t ld, const T* row_lse, const T* g_row,
                  const T* col_lse, const T* g_col) {
  for (int64_t i = 0; i < rows; ++i) {
    T* si = s + i * ld;
    for (int64_t j = 0; j < cols; ++j) {
      si[j] = g_row[i] * std::exp(si[j] - row_lse[i]) + g_col[j] * std::exp(si[j] - col_lse[j]);
    }
  }
}

// softplus(u) = log(1 + exp(u)) = max(u, 0) + log1p(exp(-|u|)): no overflow for
// any u, full relative precision where it is tiny (mmkernels/ops/siglip.py).
template <typename T>
T softplus(T u) {
  return (u > 0 ? u : T(0)) + std::log1p(std::exp(-std::abs(u)));
}

// sigmoid(u) from exp(-|u|) <= 1: no overflow, full relative precision where it is tiny.
template <typename T>
T sigmoid(T u) {
  const T e = std::exp(-std::abs(u));
  return (u >= 0 ? T(1) : e) / (T(1) + e);
}

// Row r's positive column in a tile (tile_ops.h), or `cols` when it has none there.
int64_t positive_col(bool positives, int64_t diag, int64_t r, int64_t cols) {
  const int64_t c = r + diag;
  return positives && c >= 0 && c < cols ? c : cols;
}

template <typename T>
void siglip_loss(const T* s, int64_t rows, int64_t cols, int64_t ld, T bias, bool positives,
                 int64_t diag, T* row_loss) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * ld;
    const int64_t pos = positive_col(positives, diag, i, cols);
    T acc = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const T x = si[j] + bias;
      acc += softplus(j == pos ? -x : x);
    }
    row_loss[i] += acc;
  }
}

template <typename T>
void siglip_grad(T* s, int64_t rows, int64_t cols, int64_t ld, T bias, bool positives, int64_t diag,
                 const T* g_row, T* p_row) {
  for (int64_t i = 0; i < rows; ++i) {
    T* si = s + i * ld;
    const int64_t pos = positive_col(positives, diag, i, cols);
    T acc = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const T x = si[j] + bias;
      // A positive's sigmoid(x) - 1 as -sigmoid(-x): no cancellation once the pair is learnt.
      si[j] = g_row[i] * (j == pos ? -sigmoid(-x) : sigmoid(x));
      acc += si[j];
    }
    p_row[i] += acc;
  }
}

bool cpu_supports(const char* isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also checks that the OS saves the vector registers.
  if (std::strcmp(isa, "avx512") == 0) return __builtin_cpu_supports("avx512f");
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::strcmp(isa, "generic") == 0;
}

// Every float variant compiled in, best first.
struct Variant {
  const char* name;
  SimdVariant (*make)();
};
SimdVariant generic_variant() { return {true, generic_tile_ops<float>()}; }
const Variant kVariants[] = {{"avx512", avx512_tile_ops}, {"avx2", avx2_tile_ops}, {"generic", generic_variant}};

TileOps<float> best_f32() {
  for (const Variant& v : kVariants) {
    SimdVariant made = v.make();
    if (made.available && cpu_supports(v.name)) return made.ops;
  }
  return generic_tile_ops<float>();
}

// Written once at first use (or by set_isa in tests), read by every kernel call.
std::atomic<const TileOps<float>*> g_f32{nullptr};

}  // namespace

template <typename T>
TileOps<T> generic_tile_ops() {
  return {&fold_stats<T>, &softmax_grad<T>, &siglip_loss<T>, &siglip_grad<T>, "generic"};
}
template TileOps<float> generic_tile_ops<float>();
template TileOps<double> generic_tile_ops<double>();

const TileOps<float>& tile_ops_f32() {
  const TileOps<float>* ops = g_f32.load(std::memory_order_acquire);
  if (ops == nullptr) {
    static const TileOps<float> best = best_f32();
    const TileOps<float>* expected = nullptr;
    g_f32.compare_exchange_strong(expected, &best);
    ops = g_f32.load(std::memory_order_acquire);
  }
  return *ops;
}

const TileOps<double>& tile_ops_f64() {
  static const TileOps<double> ops = generic_tile_ops<double>();
  return ops;
}

const char* const* supported_isas(int* count) {
  static const char* names[3];
  static int n = [] {
    int k = 0;
    for (const Variant& v : kVariants) {
      if (v.make().available && cpu_supports(v.name)) names[k++] = v.name;
    }
    return k;
  }();
  *count = n;
  return names;
}

bool set_isa(const char* isa) {
  static TileOps<float> chosen[3];
  for (int k = 0; k < 3; ++k) {
    const Variant& v = kVariants[k];
    if (std::strcmp(v.name, isa) != 0) continue;
    SimdVariant made = v.make();
    if (!made.available || !cpu_supports(v.name)) return false;
    chosen[k] = made.ops;
    g_f32.store(&chosen[k], std::memory_order_release);
    return true;
  }
  return false;
}

}  // namespace mmkernels::cpu
