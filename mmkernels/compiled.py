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

Numerics: statistics in fp32 (fp64 for fp64 inputs) whatever the input dtype;
products in fp32 too, fp16 inputs converted to fp32 operands once, O(N*D). bf16
inputs on CPUs with AVX512-BF16 multiply as bf16 with fp32 accumulation and
fp32 logits (the backward's P rounded to bf16 for its two products, as on GPU);
elsewhere they are converted like fp16: :func:`cpu_kernel_paths` says which.
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


def cpu_kernel_paths() -> dict[str, dict[str, str]]:
    """What the C++ CPU kernels run for inputs of each dtype, in this process.

    For each of "float64", "float32", "bfloat16" and "float16": ``"products"``,
    the tile matrix products (``"avx512_bf16"``: bf16 operands with fp32
    accumulation, our own kernels; ``"fp32"`` or ``"fp64"``: the operands in
    that dtype through ATen's BLAS), and ``"elementwise"``, the instruction set
    of the exp/max/sum passes over each tile (:func:`cpu_isa`; "generic" for
    fp64). Chosen once per process from the CPU's features, best first; the
    environment variables ``MMKERNELS_CPU_BF16_PRODUCTS`` (``avx512_bf16`` or
    ``fp32``) and ``MMKERNELS_CPU_ISA`` (``avx512``, ``avx2`` or ``generic``)
    force a path (an unsupported one raises ValueError here and at the first
    call). fp16 keeps fp32 products: fp16 to bf16 is not exact, and without
    AVX512-FP16 (which no machine of this project has had) fp32 is the fastest
    exact path. See docs/cpu-bf16.md.
    """
    isa = cpu_isa()
    bf16 = _extension._C.cpu_bf16_products()
    return {
        "float64": {"products": "fp64", "elementwise": "generic"},
        "float32": {"products": "fp32", "elementwise": isa},
        "bfloat16": {"products": bf16, "elementwise": isa},
        "float16": {"products": "fp32", "elementwise": isa},
    }
