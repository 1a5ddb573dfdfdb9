// CUDA on the CPU, for tests only: force-included (g++ -include emu.h) in
// front of csrc/cuda/kernels.cu, which compiles unchanged. The emulation is
// strict where the hardware or the programming guide is: a rule broken fails
// loudly (a message naming the kernel, then abort) instead of computing
// something plausible.
//
// Execution model: the blocks of a grid run one after another; the threads of
// a block run as real concurrent threads, so that ThreadSanitizer sees every
// access a missing __syncthreads() leaves unordered.
#pragma once

// Before the toolkit's headers: crt/host_defines.h keeps a __shared__ that is
// already defined. A function-local static is private to the running block
// because blocks run one at a time, and shared by that block's threads.
#define __shared__ static
#define __launch_bounds__(...)

// The toolkit's own half and bfloat16 types and conversions (their host paths).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "emu_runtime.h"
#include "emu_wmma.h"
