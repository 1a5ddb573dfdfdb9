// Integer helpers of the CPU and CUDA host code. Neither torch nor CUDA
// headers: the CUDA emulation lane (tests/cuda_emulation/) compiles
// csrc/cuda/bands.h and kernels.cu, which include this, with a plain g++.
#pragma once

#include <cstdint>

namespace mmkernels {

// ceil(a / b) for a >= 0, b > 0.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mmkernels
