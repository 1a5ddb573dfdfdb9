"""The ``triton`` backend: Triton kernels for the primitive, normalized_similarity and SigLIP.

Importing this package registers, through ``torch.library.triton_op`` +
``wrap_triton`` (so ``torch.compile(fullgraph=True)`` sees the kernels),

- ``mmkernels::triton_lse_fwd`` / ``triton_lse_bwd``: the primitive
  (mmkernels/ops/logsumexp.py), kernels in :mod:`mmkernels.triton.logsumexp`;
- ``mmkernels::triton_masked_lse_fwd`` / ``triton_masked_lse_bwd``: the primitive
  with exclusions and a frozen side (mmkernels/ops/masked_logsumexp.py), the same
  kernels with the rules switched on by constexpr flags;
- ``mmkernels::triton_similarity_fwd`` / ``triton_similarity_bwd``:
  normalized_similarity (mmkernels/ops/similarity.py), kernels in
  :mod:`mmkernels.triton.similarity`;
- ``mmkernels::triton_siglip_fwd`` / ``triton_siglip_bwd``: SigLIP's sigmoid
  loss (mmkernels/ops/siglip.py), kernels in :mod:`mmkernels.triton.siglip`
  (same forward grid and blocked backward as the primitive, softplus and
  sigmoid in place of the exponentials: the same 8*N*M*D-FLOP floor);

all sharing the products of :mod:`mmkernels.triton.matmul` and the launch
configuration of :mod:`mmkernels.triton._launch`. The kernels run on CUDA
tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them).

Cost at a glance (forward + backward of the primitive, N x M x D):

==========  ===================  ===================  ==========================
pass        matrix products      exps per logit       memory beyond the inputs
==========  ===================  ===================  ==========================
forward     1 (S, once)          1 (2 in rare tiles)  partials, <= 64 (N + M) fp32
backward    3 (S again, dA, dB)  1 (2 in rare tiles)  pb, pa (fp32, the contract)
                                                      + one P block (<= 32 MiB)
==========  ===================  ===================  ==========================

i.e. the 8*N*M*D-FLOP floor and 2 exps per logit (each a multiply and one
MUFU ex2; logsumexp.py says why log2(e) is not folded into the scale).
Normalization costs no pass over S: inverse norms are row and column factors
of each tile, and rescale the features inside the backward's K-loops. The
gradient of logit_scale falls out of pb in the shared epilogue
(mmkernels/ops/_common.py). No kernel uses atomics: results are bitwise
reproducible; under ``torch.use_deterministic_algorithms(True)`` autotuning
keeps to each kernel's first candidate, so they are also the same from one
process to the next (a choice made by timing could change the order of sums).
fp16/bf16/fp32/fp64 inputs, fp32 (fp64) accumulation, gradients in the input
dtype; fp32 inputs follow ``torch.get_float32_matmul_precision()``:
"highest" multiplies exactly, "high" and "medium" use tf32. Any N, M, D
(masked edges), any strides, int64 offsets. Details and the numerics of each
choice: the docstrings of the modules named above.
"""

from mmkernels.ops import logsumexp as _logsumexp_op
from mmkernels.ops import masked_logsumexp as _masked_logsumexp_op
from mmkernels.ops import siglip as _siglip_op
from mmkernels.ops import similarity as _similarity_op
from mmkernels.triton.logsumexp import (triton_lse_bwd, triton_lse_fwd, triton_masked_lse_bwd,
                                       triton_masked_lse_fwd)
from mmkernels.triton.siglip import triton_siglip_bwd, triton_siglip_fwd
from mmkernels.triton.similarity import triton_similarity_bwd, triton_similarity_fwd

# triton_op derives its own fake (meta) kernels from the Python launchers.
_logsumexp_op.KERNELS.register("triton", triton_lse_fwd, triton_lse_bwd, register_fake=False)
_masked_logsumexp_op.KERNELS.register("triton", triton_masked_lse_fwd, triton_masked_lse_bwd,
                                      register_fake=False)
_similarity_op.KERNELS.register("triton", triton_similarity_fwd, triton_similarity_bwd,
                                register_fake=False)
_siglip_op.KERNELS.register("triton", triton_siglip_fwd, triton_siglip_bwd, register_fake=False)

__all__ = ["triton_lse_fwd", "triton_lse_bwd", "triton_masked_lse_fwd", "triton_masked_lse_bwd",
           "triton_similarity_fwd", "triton_similarity_bwd",
           "triton_siglip_fwd", "triton_siglip_bwd"]
