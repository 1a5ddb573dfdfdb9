r"""The compiled backends ``cpu`` and ``cuda``: the C++ kernels of csrc/.

Importing this module registers them in the kernel table of every op family
(the primitive of mmkernels/ops/logsumexp.py, SigLIP's loss of siglip.py and
normalized_similarity of similarity.py); ``import mmkernels`` does so when the
extension is built. The
extension mmkernels._C defines the op schemas once, in C++ (csrc/ops.cpp),
and implements them for the CPU (csrc/cpu/) and, when built with them, the
CUDA (csrc/cuda/) dispatch keys; the same op serves both backend names,
dispatched on the tensors' device. The autograd formulas and fake kernels
shared by every backend are attached here, in Python.

===========================  ========================================================
op                           contract
===========================  ========================================================
``compiled_lse_fwd``         ``(a, b, scale, normalize) -> (row_lse, col_lse)``
``compiled_lse_bwd``         ``(a, b, scale, normalize, row_lse, col_lse, g_row, g_col) -> (pb, pa)``
``compiled_masked_lse_fwd``  ``(a, b, scale, normalize, <the six rules>) -> (row_lse, col_lse)``
``compiled_masked_lse_bwd``  ``(a, b, scale, normalize, <the six rules>, <the lse bwd's four>, compute_pb, compute_pa) -> (pb, pa)``
``compiled_siglip_fwd``      ``(a, b, scale, bias, normalize, positives_on_diagonal) -> row``
``compiled_siglip_bwd``      ``(a, b, scale, bias, normalize, positives_on_diagonal, g_row) -> (pb, pa, p_row)``
``compiled_similarity_fwd``  ``(a, b, scale) -> S`` (input dtype)
``compiled_similarity_bwd``  ``(a, b, scale, grad) -> (pb, pa)``
===========================  ========================================================

Numerics: products and statistics in fp32 (fp64 for fp64 inputs) whatever the
input dtype; fp16/bf16 inputs are converted to fp32 operands once, O(N*D).
The CPU tile kernels' exp is a vectorized polynomial within 1 ulp of the
correctly rounded exp, SigLIP's softplus and sigmoid within 3 ulp of the exact
values (csrc/cpu/tile_ops_simd.inc); the instruction set
(AVX-512, AVX2+FMA or portable C++) is chosen at run time: :func:`cpu_isa`
says which.
"""

from __future__ import annotations

import torch

from mmkernels import _extension
from mmkernels.ops import logsumexp, masked_logsumexp, siglip, similarity

if not (_extension.cpu_built() or _extension.cuda_built()):
    raise ImportError(_extension.why_unavailable() or "mmkernels._C holds no kernels")

_ops = torch.ops.mmkernels
lse_fwd = _ops.compiled_lse_fwd.default
lse_bwd = _ops.compiled_lse_bwd.default
siglip_fwd = _ops.compiled_siglip_fwd.default
siglip_bwd = _ops.compiled_siglip_bwd.default
similarity_fwd = _ops.compiled_similarity_fwd.default
similarity_bwd = _ops.compiled_similarity_bwd.default
masked_lse_fwd = _ops.compiled_masked_lse_fwd.default
masked_lse_bwd = _ops.compiled_masked_lse_bwd.default

# One op pair serves both names, dispatched on the tensors' device.
BACKENDS = ("cpu", "cuda")
logsumexp.KERNELS.register(BACKENDS, lse_fwd, lse_bwd)
siglip.KERNELS.register(BACKENDS, siglip_fwd, siglip_bwd)
similarity.KERNELS.register(BACKENDS, similarity_fwd, similarity_bwd)
# The masked primitive: CPU kernels always, CUDA ones when built with them (one
# registration: the autograd formula attaches once per op).
masked_logsumexp.KERNELS.register(("cpu", "cuda") if _extension.cuda_built() else "cpu",
                                  masked_lse_fwd, masked_lse_bwd)


def products_computed() -> tuple[int, int, int]:
    """(S, pb, pa): how many N x M x D products the masked backward kernels have
    computed in this process (a test hook: a frozen side computes no pb or pa)."""
    return _extension._C.products_computed()


def cpu_isa() -> str:
    """Instruction set of the float CPU tile kernels in use: "avx512", "avx2" or "generic"."""
    return _extension._C.cpu_isa()
