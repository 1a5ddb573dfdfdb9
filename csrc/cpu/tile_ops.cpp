// The portable tile kernels (double, and float on CPUs without AVX2) and the
// choice of the float kernels at run time. Same algorithm as
// tile_ops_simd.inc, one element at a time, with std::exp and std::log1p.
#include "tile_ops.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
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

// What each statistic sees of logit x at tile row r, column c: x, or -inf
// where the entry leaves it (tile_ops_simd.inc has the vector version).
struct NoExclusions {
  template <typename T>
  void split(int64_t, int64_t, T x, T& x_row, T& x_col) const {
    x_row = x;
    x_col = x;
  }
};

template <typename T>
struct ScalarExclusions {
  const TileExclusions<T>& rules;

  void split(int64_t r, int64_t c, T x, T& x_row, T& x_col) const {
    constexpr T out = -std::numeric_limits<T>::infinity();
    if (c == rules.positives[r] - rules.col0) {  // a positive pair is never excluded
      x_row = x_col = x;
      return;
    }
    const bool common = (rules.exclude_diagonal && c == r + rules.diag) ||
                        (rules.row_groups && rules.row_groups[r] == rules.col_groups[c]);
    // Thresholds exclude strictly above them (a NaN logit stays).
    x_row = common || (rules.row_threshold && x > rules.row_threshold[r]) ? out : x;
    x_col = common || (rules.col_threshold && x > rules.col_threshold[c]) ? out : x;
  }
};

template <typename T, class Exclusions>
void fold_stats_with(const T* s, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum,
                     T* col_max, T* col_sum, T* work, const Exclusions& ex) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  T* col_shift = work;
  T* row_shift = work + cols;
  T x_row, x_col;
  for (int64_t j = 0; j < cols; ++j) col_shift[j] = -kInf;
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * ld;
    T m = -kInf;
    for (int64_t j = 0; j < cols; ++j) {
      ex.split(i, j, si[j], x_row, x_col);
      m = x_row > m ? x_row : m;
      col_shift[j] = x_col > col_shift[j] ? x_col : col_shift[j];
    }
    row_shift[i] = m;
  }
  rescale_running(row_max, row_sum, row_shift, rows);
  rescale_running(col_max, col_sum, col_shift, cols);
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * ld;
    T acc = 0;
    for (int64_t j = 0; j < cols; ++j) {
      ex.split(i, j, si[j], x_row, x_col);
      acc += std::exp(x_row - row_shift[i]);
      col_sum[j] += std::exp(x_col - col_shift[j]);
    }
    row_sum[i] += acc;
  }
}

template <typename T, class Exclusions>
void softmax_grad_with(T* s, int64_t rows, int64_t cols, int64_t ld, const T* row_lse, const T* g_row,
                       const T* col_lse, const T* g_col, const Exclusions& ex) {
  T x_row, x_col;
  for (int64_t i = 0; i < rows; ++i) {
    T* si = s + i * ld;
    for (int64_t j = 0; j < cols; ++j) {
      ex.split(i, j, si[j], x_row, x_col);
      si[j] = g_row[i] * std::exp(x_row - row_lse[i]) + g_col[j] * std::exp(x_col - col_lse[j]);
    }
  }
}

template <typename T>
void fold_stats(const T* s, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum, T* col_max,
                T* col_sum, T* work) {
  fold_stats_with(s, rows, cols, ld, row_max, row_sum, col_max, col_sum, work, NoExclusions{});
}

template <typename T>
void fold_stats_masked(const T* s, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum,
                       T* col_max, T* col_sum, T* work, const TileExclusions<T>& rules) {
  fold_stats_with(s, rows, cols, ld, row_max, row_sum, col_max, col_sum, work, ScalarExclusions<T>{rules});
}

template <typename T>
void softmax_grad(T* s, int64_t rows, int64_t cols, int64_t ld, const T* row_lse, const T* g_row,
                  const T* col_lse, const T* g_col) {
  softmax_grad_with(s, rows, cols, ld, row_lse, g_row, col_lse, g_col, NoExclusions{});
}

template <typename T>
void softmax_grad_masked(T* s, int64_t rows, int64_t cols, int64_t ld, const T* row_lse, const T* g_row,
                         const T* col_lse, const T* g_col, const TileExclusions<T>& rules) {
  softmax_grad_with(s, rows, cols, ld, row_lse, g_row, col_lse, g_col, ScalarExclusions<T>{rules});
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

// The variant named `name` if it is compiled in and this CPU runs it, else null.
const SimdVariant* runnable(const char* name, SimdVariant& made) {
  for (const Variant& v : kVariants) {
    if (std::strcmp(v.name, name) != 0) continue;
    made = v.make();
    return made.available && cpu_supports(v.name) ? &made : nullptr;
  }
  return nullptr;
}

TileOps<float> best_f32() {
  SimdVariant made;
  // MMKERNELS_CPU_ISA forces one (tests of every path a machine runs); an unknown or
  // unsupported name is an error at the first float call.
  const char* forced = std::getenv("MMKERNELS_CPU_ISA");
  if (forced != nullptr && *forced != 0) {
    if (runnable(forced, made)) return made.ops;
    throw std::invalid_argument(std::string("MMKERNELS_CPU_ISA=") + forced +
                                ": not an instruction set this CPU runs (avx512, avx2 or generic)");
  }
  for (const Variant& v : kVariants) {
    if (runnable(v.name, made)) return made.ops;
  }
  return generic_tile_ops<float>();
}

// Written once at first use (or by set_isa in tests), read by every kernel call.
std::atomic<const TileOps<float>*> g_f32{nullptr};

}  // namespace

template <typename T>
TileOps<T> generic_tile_ops() {
  return {&fold_stats<T>,  &softmax_grad<T>, &fold_stats_masked<T>, &softmax_grad_masked<T>,
          &siglip_loss<T>, &siglip_grad<T>,  "generic"};
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
    SimdVariant made;
    for (const Variant& v : kVariants) {
      if (runnable(v.name, made)) names[k++] = v.name;
    }
    return k;
  }();
  *count = n;
  return names;
}

bool set_isa(const char* isa) {
  static TileOps<float> chosen[3];
  SimdVariant made;
  if (!runnable(isa, made)) return false;
  for (int k = 0; k < 3; ++k) {
    if (std::strcmp(kVariants[k].name, isa) != 0) continue;
    chosen[k] = made.ops;
    g_f32.store(&chosen[k], std::memory_order_release);
  }
  return true;
}

}  // namespace mmkernels::cpu
