// The compiled ops as each device registers them: one list of the op names (their
// schemas: csrc/ops.cpp) for the CPU (csrc/cpu/kernels.cpp) and the CUDA
// (csrc/cuda/ops_cuda.cpp) implementations, so that the two lists cannot drift apart.
#pragma once

#include <torch/library.h>

#include "common.h"

namespace mmkernels {

// Registers one device's implementation of every compiled op, in `m` (a
// TORCH_LIBRARY_IMPL block for its dispatch key). The masked pair goes through
// masked_lse_fwd_op / masked_lse_bwd_op (common.h), which pack and check the
// rules for every device. A function whose signature does not match its
// schema fails the registration when the extension is imported.
template <auto lse_fwd, auto lse_bwd, MaskedFwd masked_lse_fwd, MaskedBwd masked_lse_bwd, auto siglip_fwd,
          auto siglip_bwd, auto similarity_fwd, auto similarity_bwd>
void register_compiled_ops(torch::Library& m) {
  m.impl("compiled_lse_fwd", lse_fwd);
  m.impl("compiled_lse_bwd", lse_bwd);
  m.impl("compiled_masked_lse_fwd", &masked_lse_fwd_op<masked_lse_fwd>);
  m.impl("compiled_masked_lse_bwd", &masked_lse_bwd_op<masked_lse_bwd>);
  m.impl("compiled_siglip_fwd", siglip_fwd);
  m.impl("compiled_siglip_bwd", siglip_bwd);
  m.impl("compiled_similarity_fwd", similarity_fwd);
  m.impl("compiled_similarity_bwd", similarity_bwd);
}

}  // namespace mmkernels
