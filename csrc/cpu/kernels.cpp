// The C++ CPU kernels: the primitive (row and column logsumexp of S, forward
// and backward), the primitive with exclusions and a frozen side, SigLIP's
// sigmoid loss and normalized_similarity, registered for the CPU dispatch key.
// Maths and the kernel contracts: mmkernels/ops/logsumexp.py,
// masked_logsumexp.py, siglip.py and similarity.py.
//
// Schedule (primitive). S is cut into tiles of `tm` rows of A by `tn` rows of
// B; the row tiles are split into one contiguous chunk per thread
// (at::parallel_for). Each tile is computed once per pass by a single-threaded
// BLAS call (at::addmm_out on tile views: nested parallelism is off inside
// parallel_for) into a per-thread buffer that stays in cache, then:
//
//   forward   fold_stats folds it into the running (max, sum of exp) of its rows
//             (owned by the thread) and of its columns (per-thread copies,
//             merged once at the end): 1 tile product, 2 exps per logit.
//   backward  softmax_grad turns S into P in place; then pb_i += P @ B_j
//             (rows owned by the thread) and pa_j += P^T @ A_i into a
//             per-thread (tn, D) partial, summed after each column tile:
//             3 tile products, 2 exps per logit (2 with a frozen side: only
//             the product of the side that trains).
//   masked    the same schedules; the tile kernels see an excluded entry as
//             -inf in the statistic it leaves (tile_ops.h): a compare or two
//             per logit and O(tile) loads of the rules.
//
// 4 GEMM-equivalents in all, extra memory O(threads * (tm * tn + tn * D + M)).
//
// SigLIP has the same two schedules (forward_tiles, backward_tiles) with
// elementwise passes that need no statistics: siglip_loss adds each row's sum
// of softplus(-z * (S + bias)) to its loss (owned by the thread); siglip_grad
// turns S into P and adds its row sums to p_row. Nothing is saved between the
// passes but the inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common.h"
#include "../register_ops.h"
#include "../int_math.h"
#include "gemm_bf16.h"
#include "kernels.h"
#include "tile_ops.h"

namespace mmkernels::cpu {
namespace {

using at::Tensor;

// Tile edges (rows of A x rows of B). 256 x 512 fp32 logits (512 KiB) fit in a
// core's L2 beside BLAS's packed panels, so the exp passes read S from cache,
// and the tile products still run at BLAS's full rate: of the shapes tried
// (128 x 512 to 1024 x 1024, fwd + bwd at N = 8192 and 16384, D = 512, on the
// 2-core development machine) it was the fastest, tied with 256 x 256.
// Tests shrink them so that small shapes straddle tile edges.
std::atomic<int64_t> g_tile_rows{256};
std::atomic<int64_t> g_tile_cols{512};

template <typename T>
const TileOps<T>& tile_ops();
template <>
const TileOps<float>& tile_ops<float>() { return tile_ops_f32(); }
template <>
const TileOps<double>& tile_ops<double>() { return tile_ops_f64(); }

// Row tiles of S split into `chunks` contiguous ranges, one per thread.
struct Schedule {
  int64_t n, m, tm, tn, row_tiles, chunks;

  Schedule(int64_t n_, int64_t m_) : n(n_), m(m_) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    // Fewer rows than threads x tile rows: thinner row tiles, so no thread idles.
    tm = std::max<int64_t>(1, std::min(g_tile_rows.load(), ceil_div(n, threads)));
    tn = std::min(g_tile_cols.load(), m);
    row_tiles = ceil_div(n, tm);
    chunks = std::min(threads, row_tiles);
  }

  // [first, last) rows of chunk c: at least one row tile each.
  std::pair<int64_t, int64_t> rows_of(int64_t c) const {
    const int64_t t0 = c * row_tiles / chunks, t1 = (c + 1) * row_tiles / chunks;
    return {t0 * tm, std::min(n, t1 * tm)};
  }
};

// A (rows, cols) view of the start of a flat per-thread buffer.
Tensor tile_view(const Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// The tile products of the schedules below on fp32 or fp64 operands: one
// single-threaded BLAS call each, on views of the operands.
struct BlasProducts {
  Tensor ah, bh;  // (N, D), (M, D): normalized and in the compute dtype
  double scale;

  int64_t d() const { return ah.size(1); }
  at::TensorOptions options() const { return ah.options(); }

  // s (rows, cols) = scale * A_i @ B_j^T.
  void logits(int64_t, Tensor& s, int64_t i0, int64_t j0) const {
    at::addmm_out(s, s, ah.narrow(0, i0, s.size(0)), bh.narrow(0, j0, s.size(1)).t(), /*beta=*/0, /*alpha=*/scale);
  }
  // After P overwrote s: pb_i (+)= P @ B_j and pa_c (+)= P^T @ A_i, each when given.
  void p_products(int64_t, const Tensor& p, int64_t i0, int64_t j0, Tensor* pb_i, bool add_pb, Tensor* pa_c,
                  bool add_pa) const {
    if (pb_i) at::addmm_out(*pb_i, *pb_i, p, bh.narrow(0, j0, p.size(1)), /*beta=*/add_pb ? 1 : 0, /*alpha=*/1);
    if (pa_c) at::addmm_out(*pa_c, *pa_c, p.t(), ah.narrow(0, i0, p.size(0)), /*beta=*/add_pa ? 1 : 0, /*alpha=*/1);
  }
};

// normalize=True on the bf16 product paths: the fp32 inverse norms of the inputs'
// rows (a: N, b: M), applied as per-logit factors instead of normalized copies.
struct InverseNorms {
  Tensor a, b;  // undefined without normalize

  InverseNorms(const Tensor& a_, const Tensor& b_, bool normalize) {
    if (normalize) {
      a = inv_norms(a_).contiguous();
      b = inv_norms(b_).contiguous();
    }
  }
  bool defined() const { return a.defined(); }
  // The factors of rows i0.. of a (of b), or null without normalize.
  const float* a_at(int64_t i0) const { return a.defined() ? a.data_ptr<float>() + i0 : nullptr; }
  const float* b_at(int64_t j0) const { return b.defined() ? b.data_ptr<float>() + j0 : nullptr; }
};

// The same products on bf16 operands, fp32 accumulation and fp32 results
// (gemm_bf16.h), for bf16 inputs on CPUs with AVX512-BF16. The operands are the
// inputs themselves (exact), normalization the inverse norms applied to each
// logit in fp32, so the logits are as exact as the fp32 path's; the backward's
// P (times those factors) is rounded to bf16 for its two products, as the GPU
// kernels do (docs/cpu-bf16.md has the errors). The operands are packed once
// per call (O((N + M) * D) bf16), P once per tile.
struct Bf16TileProducts {
  const Bf16Products& k;
  float scale;
  int64_t dim, d16, tm, tn, tn16;
  Tensor a16;          // (N, De) bf16, De = D rounded up to even (a zero pad column)
  InverseNorms norms;
  Tensor b_logits;     // per column tile: B_j^T packed, (De / 2, tn16) words
  Tensor b_rows;       // backward, per column tile: B_j packed by rows, (ceil(tn / 2), d16) words
  Tensor a_rows;       // backward, per row tile: A_i packed by rows, (ceil(tm / 2), d16) words
  Tensor p16, p_pairs; // backward, per chunk: P rounded, row-major (tm, tn + 1) and packed (ceil(tm / 2), tn16)

  static int64_t round_up(int64_t x, int64_t k) { return ceil_div(x, k) * k; }
  static uint32_t* words(const Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr()); }
  static uint16_t* halves(const Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

  // a (N, D), b (M, D): the bf16 inputs.
  Bf16TileProducts(const Bf16Products& kernels, const Tensor& a, const Tensor& b, bool normalize, double scale_,
                   const Schedule& sched, bool backward)
      : k(kernels), scale(static_cast<float>(scale_)), dim(a.size(1)), d16(round_up(dim, 16)), tm(sched.tm),
        tn(sched.tn), tn16(round_up(sched.tn, 16)), norms(a, b, normalize) {
    const int64_t pad = dim & 1;
    auto operand = [&](const Tensor& x) { return (pad ? at::constant_pad_nd(x, {0, 1}) : x).contiguous(); };
    a16 = operand(a);
    const Tensor b16 = operand(b);
    const int64_t de = dim + pad, col_tiles = ceil_div(sched.m, tn), row_tiles = ceil_div(sched.n, tm);
    const auto word_opts = a.options().dtype(at::kInt);
    b_logits = at::empty({col_tiles, de / 2 * tn16}, word_opts);
    if (backward) {
      b_rows = at::empty({col_tiles, ceil_div(tn, 2) * d16}, word_opts);
      a_rows = at::empty({row_tiles, ceil_div(tm, 2) * d16}, word_opts);
      p16 = at::empty({sched.chunks, tm * (tn + 1)}, a.options().dtype(at::kBFloat16));
      p_pairs = at::empty({sched.chunks, ceil_div(tm, 2) * tn16}, word_opts);
    }
    const uint16_t* b_ptr = halves(b16);
    const uint16_t* a_ptr = halves(a16);
    at::parallel_for(0, col_tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t cols = std::min(tn, sched.m - t * tn);
        k.pack_transposed(b_ptr + t * tn * de, cols, de, de, words(b_logits[t]), tn16);
        if (backward) k.pack_rows(b_ptr + t * tn * de, cols, dim, de, words(b_rows[t]), d16);
      }
    });
    if (backward) {
      at::parallel_for(0, row_tiles, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t rows = std::min(tm, sched.n - t * tm);
          k.pack_rows(a_ptr + t * tm * de, rows, dim, de, words(a_rows[t]), d16);
        }
      });
    }
  }

  int64_t d() const { return dim; }
  at::TensorOptions options() const { return a16.options().dtype(at::kFloat); }

  void logits(int64_t, Tensor& s, int64_t i0, int64_t j0) const {
    const int64_t de2 = a16.size(1) / 2;
    k.gemm(s.size(0), s.size(1), de2, words(a16) + i0 * de2, de2, 1, words(b_logits[j0 / tn]), tn16, scale,
           norms.a_at(i0), norms.b_at(j0), false, s.data_ptr<float>(), s.size(1));
  }

  void p_products(int64_t c, const Tensor& p, int64_t i0, int64_t j0, Tensor* pb_i, bool add_pb, Tensor* pa_c,
                  bool add_pa) const {
    const int64_t rows = p.size(0), cols = p.size(1), even = cols + (cols & 1);
    uint16_t* rounded = halves(p16[c]);
    uint32_t* pairs = words(p_pairs[c]);
    // Products with the normalized operands: P's columns times B's inverse norms, its rows times A's.
    k.round_p(p.data_ptr<float>(), rows, cols, cols, norms.a_at(i0), norms.b_at(j0), rounded, pairs, tn16);
    if (pb_i) {  // (rows, D) (+)= P (rows, cols) @ B_j (cols, D)
      k.gemm(rows, dim, even / 2, reinterpret_cast<const uint32_t*>(rounded), even / 2, 1, words(b_rows[j0 / tn]),
             d16, 1.0f, nullptr, nullptr, add_pb, pb_i->data_ptr<float>(), dim);
    }
    if (pa_c) {  // (cols, D) (+)= P^T (cols, rows) @ A_i (rows, D)
      k.gemm(cols, dim, ceil_div(rows, 2), pairs, 1, tn16, words(a_rows[i0 / tm]), d16, 1.0f, nullptr, nullptr,
             add_pa, pa_c->data_ptr<float>(), dim);
    }
  }
};

// The same contract through MKL's bf16 x bf16 -> fp32 product (gemm_bf16.h:
// AMX tiles where the CPU has them), for bf16 inputs where bf16_path() is kMkl.
// The operands are the inputs; normalization scales each logit tile after its
// product, and P (times the factors) is rounded to bf16 twice per tile, as in
// Bf16TileProducts.
struct MklBf16TileProducts {
  MklBf16Gemm gemm;
  float scale;
  int64_t dim;
  Tensor a16, b16;      // (N, D), (M, D) bf16, contiguous
  InverseNorms norms;
  Tensor p_cols, p_rows, scaled;  // backward, per chunk: P * B's factors, P * A's (bf16), an fp32 scratch

  MklBf16TileProducts(MklBf16Gemm gemm_, const Tensor& a, const Tensor& b, bool normalize, double scale_,
                      const Schedule& sched, bool backward)
      : gemm(gemm_), scale(static_cast<float>(scale_)), dim(a.size(1)), a16(a.contiguous()), b16(b.contiguous()),
        norms(a, b, normalize) {
    TORCH_CHECK(std::max({sched.n, sched.m, dim}) < (int64_t{1} << 31), "mkl bf16 products: sizes beyond 2^31");
    if (backward) {
      p_cols = at::empty({sched.chunks, sched.tm * sched.tn}, a.options());
      p_rows = at::empty({sched.chunks, sched.tm * sched.tn}, a.options());
      scaled = at::empty({sched.chunks, sched.tm * sched.tn}, a.options().dtype(at::kFloat));
    }
  }

  int64_t d() const { return dim; }
  at::TensorOptions options() const { return a16.options().dtype(at::kFloat); }
  const at::BFloat16* row(const Tensor& x, int64_t i) const { return x.data_ptr<at::BFloat16>() + i * dim; }

  void logits(int64_t, Tensor& s, int64_t i0, int64_t j0) const {
    const int rows = static_cast<int>(s.size(0)), cols = static_cast<int>(s.size(1)), k = static_cast<int>(dim);
    gemm(kCblasRowMajor, kCblasNoTrans, kCblasTrans, rows, cols, k, scale, row(a16, i0), k, row(b16, j0), k, 0.0f,
         s.data_ptr<float>(), cols);
    if (norms.defined()) s.mul_(norms.a.narrow(0, i0, rows).unsqueeze(1)).mul_(norms.b.narrow(0, j0, cols));
  }

  // P times factors (or P itself), rounded to bf16 into the chunk's buffer `out`.
  Tensor rounded(const Tensor& p, const Tensor& factors, const Tensor& out, const Tensor& work) const {
    Tensor view = tile_view(out, p.size(0), p.size(1));
    if (!factors.defined()) return view.copy_(p);
    Tensor tmp = tile_view(work, p.size(0), p.size(1));
    return view.copy_(at::mul_out(tmp, p, factors));
  }

  void p_products(int64_t c, const Tensor& p, int64_t i0, int64_t j0, Tensor* pb_i, bool add_pb, Tensor* pa_c,
                  bool add_pa) const {
    const int rows = static_cast<int>(p.size(0)), cols = static_cast<int>(p.size(1)), k = static_cast<int>(dim);
    if (pb_i) {  // (rows, D) (+)= (P * inv_b) (rows, cols) @ B_j (cols, D)
      const Tensor pc = rounded(p, norms.defined() ? norms.b.narrow(0, j0, cols) : Tensor(), p_cols[c], scaled[c]);
      gemm(kCblasRowMajor, kCblasNoTrans, kCblasNoTrans, rows, k, cols, 1.0f, pc.data_ptr(), cols, row(b16, j0), k,
           add_pb ? 1.0f : 0.0f, pb_i->data_ptr<float>(), k);
    }
    if (pa_c) {  // (cols, D) (+)= (P * inv_a)^T (cols, rows) @ A_i (rows, D)
      const Tensor pr =
          rounded(p, norms.defined() ? norms.a.narrow(0, i0, rows).unsqueeze(1) : Tensor(), p_rows[c], scaled[c]);
      gemm(kCblasRowMajor, kCblasTrans, kCblasNoTrans, cols, k, rows, 1.0f, pr.data_ptr(), cols, row(a16, i0), k,
           add_pa ? 1.0f : 0.0f, pa_c->data_ptr<float>(), k);
    }
  }
};

// Forward schedule: calls visit(c, i0, j0, s) on every tile s = scale * A_i @ B_j^T
// of S, in the thread of chunk c (rows i0.., columns j0..), row tile by row tile.
template <class Products, typename Visit>
void forward_tiles(const Schedule& sched, const Products& products, Visit&& visit) {
  Tensor tiles = at::empty({sched.chunks, sched.tm * sched.tn}, products.options());
  // Worker threads get the caller's dispatch state (inference mode, ...) for the ATen calls.
  const at::ThreadLocalState state;
  at::parallel_for(0, sched.chunks, 1, [&](int64_t c0, int64_t c1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t c = c0; c < c1; ++c) {
      const auto [r0, r1] = sched.rows_of(c);
      for (int64_t i0 = r0; i0 < r1; i0 += sched.tm) {
        const int64_t rows = std::min(sched.tm, r1 - i0);
        for (int64_t j0 = 0; j0 < sched.m; j0 += sched.tn) {
          const int64_t cols = std::min(sched.tn, sched.m - j0);
          Tensor s = tile_view(tiles[c], rows, cols);
          products.logits(c, s, i0, j0);
          visit(c, i0, j0, s);
        }
      }
    }
  });
}

// Backward schedule: column tile by column tile, every tile S is computed,
// to_p(i0, j0, s) overwrites it with P (contiguous, rows x cols), then
// pb_i (+)= P @ B_j (rows owned by the thread) and pa_j (+)= P^T @ A_i into a
// per-thread partial, summed after the column tile. pb and pa: (N, D), (M, D);
// a product not wanted (`compute_pb`, `compute_pa` false: a frozen side) is
// not computed, and its tensor is not touched.
template <class Products, typename ToP>
void backward_tiles(const Schedule& sched, const Products& products, Tensor& pb, Tensor& pa, ToP&& to_p,
                    bool compute_pb = true, bool compute_pa = true) {
  Tensor tiles = at::empty({sched.chunks, sched.tm * sched.tn}, products.options());
  // Chunk 0 accumulates straight into pa; the others into their own partial.
  Tensor partials = at::empty({compute_pa ? sched.chunks - 1 : 0, sched.tn, products.d()}, products.options());
  const at::ThreadLocalState state;
  for (int64_t j0 = 0; j0 < sched.m; j0 += sched.tn) {
    const int64_t cols = std::min(sched.tn, sched.m - j0);
    Tensor pa_j = compute_pa ? pa.narrow(0, j0, cols) : pa;
    at::parallel_for(0, sched.chunks, 1, [&](int64_t c0, int64_t c1) {
      at::ThreadLocalStateGuard guard(state);
      for (int64_t c = c0; c < c1; ++c) {
        const auto [r0, r1] = sched.rows_of(c);
        Tensor pa_c = c == 0 || !compute_pa ? pa_j : partials[c - 1].narrow(0, 0, cols);
        for (int64_t i0 = r0; i0 < r1; i0 += sched.tm) {
          const int64_t rows = std::min(sched.tm, r1 - i0);
          Tensor p = tile_view(tiles[c], rows, cols);
          products.logits(c, p, i0, j0);
          to_p(i0, j0, p);
          Tensor pb_i = compute_pb ? pb.narrow(0, i0, rows) : pb;
          products.p_products(c, p, i0, j0, compute_pb ? &pb_i : nullptr, j0 != 0, compute_pa ? &pa_c : nullptr,
                              i0 != r0);
        }
      }
    });
    if (compute_pa) {
      for (int64_t c = 1; c < sched.chunks; ++c) pa_j.add_(partials[c - 1].narrow(0, 0, cols));
    }
  }
}

// The exclusion rules of a whole masked call (as a tile at (0, 0) sees them)
// offset to the tile at (i0, j0), in column tile j0 / tn of the schedule.
template <typename T>
TileExclusions<T> for_tile(const TileExclusions<T>& all, int64_t i0, int64_t j0, int64_t tn) {
  auto shift = [](const T* p, int64_t k) { return p ? p + k : nullptr; };
  const uint8_t* hits = all.group_hits ? all.group_hits + i0 * all.group_hits_stride + j0 / tn : nullptr;
  return {all.exclude_diagonal,        i0 - j0, all.positives + i0,           j0,
          shift(all.row_groups, i0),   shift(all.col_groups, j0), shift(all.row_threshold, i0),
          shift(all.col_threshold, j0), hits,   all.group_hits_stride};
}

// For each row i and column tile t (columns t*tn..): 1 where some column of the
// tile has row i's group. Most rows meet their group in one tile or none (the
// other copies of a duplicated item), so the tile kernels skip the group compare
// elsewhere. N x column-tiles bytes, built in O(N + M log M + hits).
template <typename T>
std::vector<uint8_t> group_hits(const TileExclusions<T>& all, int64_t n, int64_t m, int64_t tn) {
  const int64_t tiles = ceil_div(m, tn);
  std::vector<std::pair<int64_t, int64_t>> group_tile(m);  // (group, column tile) of each column
  for (int64_t j = 0; j < m; ++j) group_tile[j] = {static_cast<int64_t>(all.col_groups[j]), j / tn};
  std::sort(group_tile.begin(), group_tile.end());
  group_tile.erase(std::unique(group_tile.begin(), group_tile.end()), group_tile.end());
  std::vector<uint8_t> hits(n * tiles, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = static_cast<int64_t>(all.row_groups[i]);
    auto it = std::lower_bound(group_tile.begin(), group_tile.end(), std::pair<int64_t, int64_t>{g, 0});
    for (; it != group_tile.end() && it->first == g; ++it) hits[i * tiles + it->second] = 1;
  }
  return hits;
}

// The rules with their group hits for this schedule's tiles (kept in `hits`).
template <typename T>
TileExclusions<T> with_group_hits(const TileExclusions<T>& all, const Schedule& sched, std::vector<uint8_t>& hits) {
  TileExclusions<T> out = all;
  if (all.row_groups) {
    hits = group_hits(all, sched.n, sched.m, sched.tn);
    out.group_hits = hits.data();
    out.group_hits_stride = ceil_div(sched.m, sched.tn);
  }
  return out;
}

// The inputs of a call and, where BLAS multiplies them, their operands in the
// compute dtype (normalized when asked). The bf16 product paths read the inputs
// themselves, so for them no compute-dtype copy is made (2 x N*D fp32 less).
struct Operands {
  const Tensor& a;
  const Tensor& b;
  bool normalize;
  int64_t n, m, d;
  at::TensorOptions options;  // of the results: the compute dtype on the inputs' device
  Bf16Path products;          // kFp32: BLAS on ah, bh (every dtype but bf16 on a bf16 path)
  Tensor ah, bh;              // undefined on the bf16 product paths

  Operands(const Tensor& a_, const Tensor& b_, bool normalize_)
      : a(a_), b(b_), normalize(normalize_), n(a_.size(0)), m(b_.size(0)), d(a_.size(1)),
        options(a_.options().dtype(compute_dtype(a_.scalar_type()))),
        products(a_.scalar_type() == at::kBFloat16 ? bf16_path() : Bf16Path::kFp32) {
    if (products != Bf16Path::kFp32) return;
    ah = scaled_operand(a, normalize, compute_dtype(a.scalar_type()));
    bh = scaled_operand(b, normalize, compute_dtype(a.scalar_type()));
  }
};

// Calls run(products) with the tile products for these operands (compute dtype
// T): for bf16 inputs those of bf16_path() (gemm_bf16.h), else BLAS on the
// compute-dtype operands.
template <typename T, typename Run>
void with_products(const Operands& x, double scale, const Schedule& sched, bool backward, Run&& run) {
  if constexpr (std::is_same_v<T, float>) {
    // The path chosen when the operands were made (a test may switch it between calls).
    if (x.products == Bf16Path::kAvx512Bf16) {
      run(Bf16TileProducts(*avx512_bf16_products(), x.a, x.b, x.normalize, scale, sched, backward));
      return;
    }
    if (x.products == Bf16Path::kMkl) {
      run(MklBf16TileProducts(mkl_bf16_gemm(), x.a, x.b, x.normalize, scale, sched, backward));
      return;
    }
  }
  run(BlasProducts{x.ah, x.bh, scale});
}

// `rules` null: the unmasked primitive.
template <typename T>
void lse_fwd_impl(const Operands& x, double scale,
                  const TileExclusions<T>* rules, Tensor& row_lse, Tensor& col_lse) {
  const int64_t n = x.n, m = x.m;
  const Schedule sched(n, m);
  const auto opts = x.options;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  Tensor row_max = at::full({n}, -kInf, opts), row_sum = at::zeros({n}, opts);
  Tensor col_max = at::full({sched.chunks, m}, -kInf, opts), col_sum = at::zeros({sched.chunks, m}, opts);
  Tensor work = at::empty({sched.chunks, sched.tm + sched.tn}, opts);
  const TileOps<T>& ops = tile_ops<T>();
  T* rmax = row_max.data_ptr<T>();
  T* rsum = row_sum.data_ptr<T>();
  T* cmax = col_max.data_ptr<T>();  // row c: chunk c's column statistics
  T* csum = col_sum.data_ptr<T>();
  T* scratch = work.data_ptr<T>();
  std::vector<uint8_t> hits;
  const TileExclusions<T> all = rules ? with_group_hits(*rules, sched, hits) : TileExclusions<T>{};
  auto fold = [&](int64_t c, int64_t i0, int64_t j0, const Tensor& s) {
    T* work_c = scratch + c * (sched.tm + sched.tn);
    if (rules == nullptr) {
      ops.fold_stats(s.data_ptr<T>(), s.size(0), s.size(1), s.size(1), rmax + i0, rsum + i0, cmax + c * m + j0,
                     csum + c * m + j0, work_c);
    } else {
      ops.fold_stats_masked(s.data_ptr<T>(), s.size(0), s.size(1), s.size(1), rmax + i0, rsum + i0,
                            cmax + c * m + j0, csum + c * m + j0, work_c, for_tile(all, i0, j0, sched.tn));
    }
  };
  with_products<T>(x, scale, sched, false, [&](const auto& products) {
    forward_tiles(sched, products, fold);
  });

  at::add_out(row_lse, row_max, row_sum.log());
  // Merge the threads' column statistics (the shift keeps all -inf columns NaN-free).
  Tensor top = col_max.amax(0);
  Tensor shift = at::where(top == -kInf, at::zeros_like(top), top);
  Tensor total = (col_sum * (col_max - shift).exp()).sum(0);
  at::add_out(col_lse, shift, total.log());
}

// `rules` null: the unmasked primitive; else row_lse and col_lse are shifts
// (tile_ops.h softmax_grad_masked).
template <typename T>
void lse_bwd_impl(const Operands& x, double scale, const TileExclusions<T>* rules,
                  const Tensor& row_lse, const Tensor& col_lse, const Tensor& g_row, const Tensor& g_col,
                  Tensor& pb, Tensor& pa, bool compute_pb = true, bool compute_pa = true) {
  const Schedule sched(x.n, x.m);
  const TileOps<T>& ops = tile_ops<T>();
  const T* rl = row_lse.data_ptr<T>();
  const T* gr = g_row.data_ptr<T>();
  const T* cl = col_lse.data_ptr<T>();
  const T* gc = g_col.data_ptr<T>();
  std::vector<uint8_t> hits;
  const TileExclusions<T> all = rules ? with_group_hits(*rules, sched, hits) : TileExclusions<T>{};
  auto to_p = [&](int64_t i0, int64_t j0, Tensor& p) {
    if (rules == nullptr) {
      ops.softmax_grad(p.data_ptr<T>(), p.size(0), p.size(1), p.size(1), rl + i0, gr + i0, cl + j0, gc + j0);
    } else {
      ops.softmax_grad_masked(p.data_ptr<T>(), p.size(0), p.size(1), p.size(1), rl + i0, gr + i0, cl + j0,
                              gc + j0, for_tile(all, i0, j0, sched.tn));
    }
  };
  with_products<T>(x, scale, sched, true, [&](const auto& products) {
    backward_tiles(sched, products, pb, pa, to_p, compute_pb, compute_pa);
  });
}

template <typename T>
void siglip_fwd_impl(const Operands& x, double scale, T bias, bool positives,
                     Tensor& row) {
  const Schedule sched(x.n, x.m);
  const TileOps<T>& ops = tile_ops<T>();
  T* loss = row.data_ptr<T>();
  auto add_loss = [&](int64_t, int64_t i0, int64_t j0, const Tensor& s) {
    ops.siglip_loss(s.data_ptr<T>(), s.size(0), s.size(1), s.size(1), bias, positives, i0 - j0, loss + i0);
  };
  with_products<T>(x, scale, sched, false, [&](const auto& products) {
    forward_tiles(sched, products, add_loss);
  });
}

template <typename T>
void siglip_bwd_impl(const Operands& x, double scale, T bias, bool positives,
                     const Tensor& g_row, Tensor& pb, Tensor& pa, Tensor& p_row) {
  const Schedule sched(x.n, x.m);
  const TileOps<T>& ops = tile_ops<T>();
  const T* gr = g_row.data_ptr<T>();
  T* pr = p_row.data_ptr<T>();
  auto to_p = [&](int64_t i0, int64_t j0, Tensor& p) {
    ops.siglip_grad(p.data_ptr<T>(), p.size(0), p.size(1), p.size(1), bias, positives, i0 - j0, gr + i0,
                    pr + i0);
  };
  with_products<T>(x, scale, sched, true, [&](const auto& products) {
    backward_tiles(sched, products, pb, pa, to_p);
  });
}

// --- ops ------------------------------------------------------------------------

std::tuple<Tensor, Tensor> lse_fwd(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize) {
  check_lse_fwd(a, b, scale);
  const auto dtype = compute_dtype(a.scalar_type());
  const Operands x(a, b, normalize);
  const double alpha = scale.item<double>();
  Tensor row_lse = at::empty({a.size(0)}, x.options);
  Tensor col_lse = at::empty({b.size(0)}, x.options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "compiled_lse_fwd", [&] {
    lse_fwd_impl<scalar_t>(x, alpha, nullptr, row_lse, col_lse);
  });
  return {row_lse, col_lse};
}

std::tuple<Tensor, Tensor> lse_bwd(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize,
                                   const Tensor& row_lse, const Tensor& col_lse, const Tensor& g_row,
                                   const Tensor& g_col) {
  check_lse_bwd(a, b, scale, row_lse, col_lse, g_row, g_col);
  const auto dtype = compute_dtype(a.scalar_type());
  const Operands x(a, b, normalize);
  const double alpha = scale.item<double>();
  auto vec = [&](const Tensor& t) { return t.to(dtype).contiguous(); };
  Tensor pb = at::empty({x.n, x.d}, x.options), pa = at::empty({x.m, x.d}, x.options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "compiled_lse_bwd", [&] {
    lse_bwd_impl<scalar_t>(x, alpha, nullptr, vec(row_lse), vec(col_lse), vec(g_row), vec(g_col), pb, pa);
  });
  return {pb, pa};
}

// --- the masked primitive ------------------------------------------------------

// Group ids renumbered 0, 1, ... over rows and columns together, as values of
// `dtype`: the tile kernels compare them in float lanes, exact below 2^24 ids.
std::pair<Tensor, Tensor> dense_groups(const Tensor& row_groups, const Tensor& col_groups, at::ScalarType dtype) {
  const auto [unique, inverse, counts] =
      at::_unique2(at::cat({row_groups, col_groups}), /*sorted=*/false, /*return_inverse=*/true);
  TORCH_CHECK(dtype == at::kDouble || unique.numel() <= (int64_t{1} << 24),
              "compiled_masked_lse: more than 2^24 distinct groups in row_groups and col_groups");
  const Tensor ids = inverse.to(dtype);
  return {ids.narrow(0, 0, row_groups.size(0)), ids.narrow(0, row_groups.size(0), col_groups.size(0))};
}

// The tensors a masked call's tile kernels read the rules from (groups
// renumbered, thresholds as given), kept alive for the call.
struct PreparedRules {
  Exclusions rules;
  Tensor row_groups, col_groups;

  PreparedRules(const Exclusions& r, at::ScalarType dtype) : rules(r) {
    if (r.row_groups.has_value()) std::tie(row_groups, col_groups) = dense_groups(*r.row_groups, *r.col_groups, dtype);
  }

  // Whether any rule is on (else the unmasked tile kernels run: a frozen side alone).
  bool any() const {
    return rules.exclude_diagonal || rules.row_groups.has_value() || rules.row_threshold.has_value() ||
           rules.col_threshold.has_value();
  }

  template <typename T>
  TileExclusions<T> whole() const {
    auto data = [](const OptionalTensor& t) { return t.has_value() ? t->data_ptr<T>() : nullptr; };
    return {rules.exclude_diagonal,
            0,
            rules.positives.data_ptr<int64_t>(),
            0,
            row_groups.defined() ? row_groups.data_ptr<T>() : nullptr,
            col_groups.defined() ? col_groups.data_ptr<T>() : nullptr,
            data(rules.row_threshold),
            data(rules.col_threshold),
            nullptr,
            0};
  }
};

// A logsumexp as the shift of exp(S - lse): 0 where it is -inf (every entry of
// the row or column excluded, so every exp there is of -inf and must stay 0).
Tensor as_shift(const Tensor& lse, at::ScalarType dtype) {
  const Tensor x = lse.to(dtype);
  return at::where(x == -std::numeric_limits<double>::infinity(), at::zeros_like(x), x).contiguous();
}

std::tuple<Tensor, Tensor> masked_lse_fwd(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize,
                                          const Exclusions& rules) {
  const auto dtype = compute_dtype(a.scalar_type());
  const Operands x(a, b, normalize);
  const double alpha = scale.item<double>();
  const PreparedRules prepared(rules, dtype);
  Tensor row_lse = at::empty({a.size(0)}, x.options);
  Tensor col_lse = at::empty({b.size(0)}, x.options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "compiled_masked_lse_fwd", [&] {
    const TileExclusions<scalar_t> tile_rules = prepared.whole<scalar_t>();
    lse_fwd_impl<scalar_t>(x, alpha, prepared.any() ? &tile_rules : nullptr, row_lse, col_lse);
  });
  return {row_lse, col_lse};
}

std::tuple<Tensor, Tensor> masked_lse_bwd(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize,
                                          const Exclusions& rules, const Tensor& row_lse, const Tensor& col_lse,
                                          const Tensor& g_row, const Tensor& g_col, bool compute_pb, bool compute_pa) {
  const auto dtype = compute_dtype(a.scalar_type());
  const Operands x(a, b, normalize);
  const double alpha = scale.item<double>();
  const PreparedRules prepared(rules, dtype);
  auto vec = [&](const Tensor& t) { return t.to(dtype).contiguous(); };
  Tensor pb = compute_pb ? at::empty({x.n, x.d}, x.options) : at::empty({0}, x.options);
  Tensor pa = compute_pa ? at::empty({x.m, x.d}, x.options) : at::empty({0}, x.options);
  if (!compute_pb && !compute_pa) return {pb, pa};
  AT_DISPATCH_FLOATING_TYPES(dtype, "compiled_masked_lse_bwd", [&] {
    const TileExclusions<scalar_t> tile_rules = prepared.whole<scalar_t>();
    lse_bwd_impl<scalar_t>(x, alpha, prepared.any() ? &tile_rules : nullptr, as_shift(row_lse, dtype),
                           as_shift(col_lse, dtype),
                           vec(g_row), vec(g_col), pb, pa, compute_pb, compute_pa);
  });
  return {pb, pa};
}

Tensor siglip_fwd(const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias, bool normalize,
                  bool positives_on_diagonal) {
  check_siglip_fwd(a, b, scale, bias);
  const auto dtype = compute_dtype(a.scalar_type());
  const Operands x(a, b, normalize);
  const double alpha = scale.item<double>();
  Tensor row = at::zeros({a.size(0)}, x.options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "compiled_siglip_fwd", [&] {
    siglip_fwd_impl<scalar_t>(x, alpha, bias.item<scalar_t>(), positives_on_diagonal, row);
  });
  return row;
}

std::tuple<Tensor, Tensor, Tensor> siglip_bwd(const Tensor& a, const Tensor& b, const Tensor& scale,
                                              const Tensor& bias, bool normalize, bool positives_on_diagonal,
                                              const Tensor& g_row) {
  check_siglip_bwd(a, b, scale, bias, g_row);
  const auto dtype = compute_dtype(a.scalar_type());
  const Operands x(a, b, normalize);
  const double alpha = scale.item<double>();
  Tensor pb = at::empty({x.n, x.d}, x.options), pa = at::empty({x.m, x.d}, x.options), p_row = at::zeros({a.size(0)}, x.options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "compiled_siglip_bwd", [&] {
    siglip_bwd_impl<scalar_t>(x, alpha, bias.item<scalar_t>(), positives_on_diagonal,
                              g_row.to(dtype).contiguous(), pb, pa, p_row);
  });
  return {pb, pa, p_row};
}

Tensor similarity_fwd(const Tensor& a, const Tensor& b, const Tensor& scale) {
  check_similarity_fwd(a, b, scale);
  const auto dtype = compute_dtype(a.scalar_type());
  const Tensor ah = scaled_operand(a, true, dtype), bh = scaled_operand(b, true, dtype);
  const double alpha = scale.item<double>();
  const int64_t n = a.size(0), m = b.size(0);
  Tensor out = at::empty({n, m}, a.options());
  if (a.scalar_type() == dtype) {  // one multi-threaded BLAS call, straight into the output
    at::addmm_out(out, out, ah, bh.t(), /*beta=*/0, /*alpha=*/alpha);
    return out;
  }
  // fp16/bf16 output: fp32 tiles, each rounded once into the output, so no
  // N x M fp32 temporary.
  forward_tiles(Schedule(n, m), BlasProducts{ah, bh, alpha}, [&](int64_t, int64_t i0, int64_t j0, const Tensor& s) {
    out.narrow(0, i0, s.size(0)).narrow(1, j0, s.size(1)).copy_(s);
  });
  return out;
}

std::tuple<Tensor, Tensor> similarity_bwd(const Tensor& a, const Tensor& b, const Tensor& scale,
                                          const Tensor& grad) {
  check_similarity_bwd(a, b, scale, grad);
  const auto dtype = compute_dtype(a.scalar_type());
  const Tensor ah = scaled_operand(a, true, dtype), bh = scaled_operand(b, true, dtype);
  // The upstream gradient is the size of S already; its compute-dtype copy (fp16/bf16) is too.
  const Tensor g = grad.to(dtype);
  return {at::mm(g, bh), at::mm(g.t(), ah)};
}

}  // namespace

TileShape tile_shape() { return {g_tile_rows.load(), g_tile_cols.load()}; }

TileShape set_tile_shape(TileShape shape) {
  TORCH_CHECK(shape.rows > 0 && shape.cols > 0, "tile shape must be positive, got (", shape.rows,
              ", ", shape.cols, ")");
  const TileShape old = tile_shape();
  g_tile_rows.store(shape.rows);
  g_tile_cols.store(shape.cols);
  return old;
}

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  register_compiled_ops<&lse_fwd, &lse_bwd, &masked_lse_fwd, &masked_lse_bwd, &siglip_fwd, &siglip_bwd,
                        &similarity_fwd, &similarity_bwd>(m);
}

}  // namespace mmkernels::cpu
