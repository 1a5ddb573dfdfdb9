// The lane's executable: runs the launchers of csrc/cuda/launch.h, on the
// emulated GPU, through the host orchestration of csrc/cuda/bands.h, with a
// plain host matrix product standing in for cuBLAS.
//
// Usage: driver JOBS. Each line of JOBS is one case:
//   op dtype n m d normalize band_rows p_dtype positives dir [rules products]
// op: fwd, bwd, sfwd, sbwd or sim; dtypes: f16, bf16, f32, f64. The inputs are
// raw little-endian arrays dir/NAME.bin (lane.py writes them), the outputs
// too. For fwd and bwd, `rules` (default "-", none) names the masked
// primitive's rules on, one letter each: d (exclude_diagonal), p (positives),
// g (row_groups, col_groups), r (row_threshold), c (col_threshold), read from
// dir; `products` (default "11") which of bwd's products pb, pa to compute. A separate process, so that an emulation failure or a sanitizer report
// ends it without taking pytest down.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "bands.h"
#include "launch.h"

namespace {

using namespace mmkernels::cuda;
using Bytes = std::vector<unsigned char>;

struct Case {
  std::string op, dir, rules = "-", products = "11";
  DType dtype, p_dtype;
  int64_t n, m, d, band_rows;
  bool normalize, positives;
};

DType parse_dtype(const std::string& name) {
  if (name == "f16") return DType::kHalf;
  if (name == "bf16") return DType::kBFloat16;
  if (name == "f32") return DType::kFloat;
  if (name == "f64") return DType::kDouble;
  throw std::runtime_error("unknown dtype " + name);
}

Bytes read_bytes(const Case& c, const std::string& name, int64_t bytes) {
  const std::string path = c.dir + "/" + name + ".bin";
  std::ifstream in(path, std::ios::binary);
  Bytes data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof()) throw std::runtime_error("cannot read " + path);
  if (static_cast<int64_t>(data.size()) != bytes)
    throw std::runtime_error(path + ": " + std::to_string(data.size()) + " bytes, expected " +
                             std::to_string(bytes));
  // A copy of exactly its size: AddressSanitizer sees a read past the end (the
  // grown vector's spare capacity would hide it).
  return Bytes(data.begin(), data.end());
}

Bytes read(const Case& c, const std::string& name, int64_t count, DType type) {
  return read_bytes(c, name, count * size_of(type));
}

void write(const Case& c, const std::string& name, const void* data, int64_t count, DType type) {
  const std::string path = c.dir + "/" + name + ".bin";
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), count * size_of(type));
  if (!out) throw std::runtime_error("cannot write " + path);
}

// Output buffers start as NaN (bytes 0xff), so that an element no kernel writes shows.
Bytes buffer(int64_t count, DType type) { return Bytes(count * size_of(type), 0xff); }

template <typename A>
Bytes filled(int64_t count, A value) {
  Bytes out(count * sizeof(A));
  for (int64_t i = 0; i < count; ++i) std::memcpy(out.data() + i * sizeof(A), &value, sizeof(A));
  return out;
}

double element(const Bytes& data, DType type, int64_t i) {
  const unsigned char* p = data.data() + i * size_of(type);
  switch (type) {
    case DType::kHalf: { __half x; std::memcpy(&x, p, 2); return __half2float(x); }
    case DType::kBFloat16: { __nv_bfloat16 x; std::memcpy(&x, p, 2); return __bfloat162float(x); }
    case DType::kFloat: { float x; std::memcpy(&x, p, 4); return x; }
    case DType::kDouble: { double x; std::memcpy(&x, p, 8); return x; }
  }
  return 0;
}

// out[i, k] (+)= sum_j x[i, j] * y[j, k] for x (rows, inner) given by `x_at`,
// y (inner, cols) row-major in y_type, accumulated in the compute type A in j order.
template <typename A, typename XAt>
void host_matmul(A* out, int64_t rows, int64_t inner, int64_t cols, XAt&& x_at, const Bytes& y, DType y_type,
                 bool accumulate) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < cols; ++k) {
      A sum = accumulate ? out[i * cols + k] : A(0);
      for (int64_t j = 0; j < inner; ++j)
        sum += static_cast<A>(x_at(i, j)) * static_cast<A>(element(y, y_type, j * cols + k));
      out[i * cols + k] = sum;
    }
}

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

// The operands and their optional inverse norms, kept alive for the Operands.
struct Inputs {
  Bytes a, b, ra, rb, scale;
  Operands x;
};

// The masked primitive's rules named by c.rules, kept alive for the Rules.
struct MaskInputs {
  Bytes positives, row_groups, col_groups, row_threshold, col_threshold;
  Rules rules;
};

MaskInputs mask_inputs(const Case& c) {
  const DType acc = compute_of(c.dtype);
  auto on = [&](char rule) { return c.rules.find(rule) != std::string::npos; };
  auto ints = [](const Bytes& data) { return reinterpret_cast<const int64_t*>(data.data()); };
  MaskInputs in;
  in.rules.exclude_diagonal = on('d');
  if (on('p')) {
    in.positives = read_bytes(c, "positives", c.n * 8);
    in.rules.positives = ints(in.positives);
  }
  if (on('g')) {
    in.row_groups = read_bytes(c, "row_groups", c.n * 8);
    in.col_groups = read_bytes(c, "col_groups", c.m * 8);
    in.rules.row_groups = ints(in.row_groups);
    in.rules.col_groups = ints(in.col_groups);
  }
  if (on('r')) {
    in.row_threshold = read(c, "row_threshold", c.n, acc);
    in.rules.row_threshold = in.row_threshold.data();
  }
  if (on('c')) {
    in.col_threshold = read(c, "col_threshold", c.m, acc);
    in.rules.col_threshold = in.col_threshold.data();
  }
  return in;
}

Inputs inputs(const Case& c) {
  const DType acc = compute_of(c.dtype);
  Inputs in;
  in.a = read(c, "a", c.n * c.d, c.dtype);
  in.b = read(c, "b", c.m * c.d, c.dtype);
  if (c.normalize) {
    in.ra = read(c, "ra", c.n, acc);
    in.rb = read(c, "rb", c.m, acc);
  }
  in.scale = read(c, "scale", 1, acc);
  in.x = Operands{c.dtype, in.a.data(), in.b.data(), c.n, c.m, c.d, c.normalize ? in.ra.data() : nullptr,
                  c.normalize ? in.rb.data() : nullptr, in.scale.data()};
  return in;
}

template <typename A>
void run_fwd(const Case& c) {
  const Inputs in = inputs(c);
  const MaskInputs mask = mask_inputs(c);
  const DType acc = compute_of(c.dtype);
  const int64_t band = band_rows(c.n, fwd_bytes_per_row(c.m, acc), c.band_rows);
  Bytes row_lse = buffer(c.n, acc), part_max = buffer(fwd_part_rows(band) * c.m, acc);
  Bytes part_sum = buffer(fwd_part_rows(band) * c.m, acc);
  Bytes col_max = filled<A>(c.m, -std::numeric_limits<A>::infinity()), col_sum = filled<A>(c.m, A(0));
  check(lse_fwd_bands(in.x, mask.rules, band, row_lse.data(), part_max.data(), part_sum.data(), col_max.data(), col_sum.data(),
                      nullptr),
        "lse_fwd_bands");
  write(c, "row_lse", row_lse.data(), c.n, acc);
  write(c, "col_max", col_max.data(), c.m, acc);
  write(c, "col_sum", col_sum.data(), c.m, acc);
}

// The backward of the primitive (bwd) or of SigLIP (sbwd): P band by band, its
// products pb = P @ Bh and pa = P^T @ Ah (those asked for), and P in full for
// the comparison (NaN in full where no band was computed).
template <typename A>
void run_bwd(const Case& c) {
  const Inputs in = inputs(c);
  const MaskInputs mask = mask_inputs(c);
  const Products asked{c.products[0] == '1', c.products[1] == '1'};
  const DType acc = compute_of(c.dtype);
  const bool siglip = c.op == "sbwd";
  const Bytes ah = read(c, "ah", c.n * c.d, c.p_dtype), bh = read(c, "bh", c.m * c.d, c.p_dtype);
  const Bytes g_row = read(c, "g_row", c.n, acc);
  Bytes row_lse, col_lse, g_col, bias;
  if (siglip) {
    bias = read(c, "bias", 1, acc);
  } else {
    row_lse = read(c, "row_lse", c.n, acc);
    col_lse = read(c, "col_lse", c.m, acc);
    g_col = read(c, "g_col", c.m, acc);
  }
  const int64_t col_blocks = siglip_col_blocks(c.m);
  const int64_t scratch = siglip ? col_blocks * size_of(acc) : 0;
  const int64_t band = band_rows(c.n, c.m * size_of(c.p_dtype) + scratch, c.band_rows);
  Bytes pband = buffer(band * c.m, c.p_dtype), part = buffer(band * col_blocks, acc);
  Bytes p_full = buffer(c.n * c.m, c.p_dtype);
  std::vector<A> pb(c.n * c.d), pa(c.m * c.d), p_row(c.n);
  const int64_t p_bytes = size_of(c.p_dtype);
  backward_band_loop(
      c.n, band, asked,
      [&](int64_t r0, int64_t rows) {
        if (siglip) {
          check(siglip_bwd_band(in.x, r0, rows, bias.data(), c.positives, g_row.data(), pband.data(), c.p_dtype,
                                part.data(), nullptr),
                "siglip_bwd_band");
          const A* sums = reinterpret_cast<const A*>(part.data());
          for (int64_t i = 0; i < rows; ++i) {
            A total = 0;
            for (int64_t k = 0; k < col_blocks; ++k) total += sums[i * col_blocks + k];
            p_row[r0 + i] = total;
          }
        } else {
          check(lse_bwd_band(in.x, mask.rules, r0, rows, row_lse.data(), g_row.data(), col_lse.data(), g_col.data(),
                             pband.data(), c.p_dtype, nullptr),
                "lse_bwd_band");
        }
        std::memcpy(p_full.data() + r0 * c.m * p_bytes, pband.data(), rows * c.m * p_bytes);
      },
      [&](int64_t r0, int64_t rows) {
        auto p_at = [&](int64_t i, int64_t j) { return element(pband, c.p_dtype, i * c.m + j); };
        host_matmul<A>(pb.data() + r0 * c.d, rows, c.m, c.d, p_at, bh, c.p_dtype, false);
      },
      [&](int64_t r0, int64_t rows, bool accumulate) {
        auto pt_at = [&](int64_t j, int64_t i) { return element(pband, c.p_dtype, i * c.m + j); };
        const Bytes ah_band(ah.begin() + r0 * c.d * p_bytes, ah.begin() + (r0 + rows) * c.d * p_bytes);
        host_matmul<A>(pa.data(), c.m, rows, c.d, pt_at, ah_band, c.p_dtype, accumulate);
      });
  write(c, "p", p_full.data(), c.n * c.m, c.p_dtype);
  if (asked.pb) write(c, "pb", pb.data(), c.n * c.d, acc);
  if (asked.pa) write(c, "pa", pa.data(), c.m * c.d, acc);
  if (siglip) write(c, "p_row", p_row.data(), c.n, acc);
}

void run_siglip_fwd(const Case& c) {
  const Inputs in = inputs(c);
  const DType acc = compute_of(c.dtype);
  const Bytes bias = read(c, "bias", 1, acc);
  Bytes row_loss = buffer(c.n, acc);
  check(siglip_fwd(in.x, bias.data(), c.positives, row_loss.data(), nullptr), "siglip_fwd");
  write(c, "row_loss", row_loss.data(), c.n, acc);
}

void run_similarity(const Case& c) {
  const Inputs in = inputs(c);
  Bytes out = buffer(c.n * c.m, c.dtype);
  check(similarity_fwd(in.x, out.data(), nullptr), "similarity_fwd");
  write(c, "out", out.data(), c.n * c.m, c.dtype);
}

void run(const Case& c) {
  const bool f64 = c.dtype == DType::kDouble;
  if (c.op == "fwd") {
    f64 ? run_fwd<double>(c) : run_fwd<float>(c);
  } else if (c.op == "bwd" || c.op == "sbwd") {
    f64 ? run_bwd<double>(c) : run_bwd<float>(c);
  } else if (c.op == "sfwd") {
    run_siglip_fwd(c);
  } else if (c.op == "sim") {
    run_similarity(c);
  } else {
    throw std::runtime_error("unknown op " + c.op);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s JOBS\n", argv[0]);
    return 2;
  }
  std::ifstream jobs(argv[1]);
  std::string line;
  int done = 0;
  try {
    while (std::getline(jobs, line)) {
      if (line.empty()) continue;
      std::istringstream fields(line);
      Case c;
      std::string dtype, p_dtype;
      int normalize = 0, positives = 0;
      fields >> c.op >> dtype >> c.n >> c.m >> c.d >> normalize >> c.band_rows >> p_dtype >> positives >> c.dir;
      if (!fields) throw std::runtime_error("bad job line: " + line);
      if (fields >> c.rules) fields >> c.products;
      if (c.products.size() != 2) throw std::runtime_error("bad products in: " + line);
      c.dtype = parse_dtype(dtype);
      c.p_dtype = parse_dtype(p_dtype);
      c.normalize = normalize != 0;
      c.positives = positives != 0;
      run(c);
      ++done;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "driver: %s (job: %s)\n", e.what(), line.c_str());
    return 1;
  }
  std::printf("driver: %d cases\n", done);
  return 0;
}
