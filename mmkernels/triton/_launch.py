"""Launching the Triton kernels: which GPU, which tiles, how many programs.

Everything a launcher decides before a kernel runs lives here, in plain Python:

- the architecture class of the device ("sm90" for H100/H200, "sm80" for
  A100 and the other GPUs, "interpreter" for CPU tensors under
  ``TRITON_INTERPRET=1``) and its number of SMs;
- the dot-product precision of fp32 inputs, from
  ``torch.get_float32_matmul_precision()``: "highest" gives exact fp32 products
  (``tl.dot(..., input_precision="ieee")``), "high" and "medium" give tf32;
- the autotune configurations of each kernel family, pruned per architecture,
  dtype and shared memory, and keyed on shape buckets (the tensors' dtypes
  are part of every Triton autotune key); one fixed small configuration under
  the interpreter, so that tests straddle tile edges at small sizes;
- the split of the forward's persistent grid into row groups x column splits;
- the size of the backward's scratch block of P;
- :func:`tile_args`, the launch arguments every S-tile kernel takes alike;
- :func:`launch`, the one call through which every kernel starts.

Config lists were written for the tensor-core paths of sm90 (wgmma,
228 KiB shared memory per SM) and sm80 (mma.sync, 164 KiB), then compiled
ahead of time for both targets with tests/triton_aot.py (no GPU needed):
every candidate here compiles without register spills (candidates that
spilled were dropped). Which one is fastest is the autotuner's call on the
GPU; timing them is the benchmarks' job.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch.library import wrap_triton

from mmkernels.ops._common import inv_norms

# Read once, like triton itself: the interpreter must be chosen before triton is imported.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRETING:
    from mmkernels.triton import _compat

    _compat.patch_interpreter()

# Usable shared memory per block (bytes), minus headroom for the layout
# conversions Triton adds to the epilogue (row/column reductions).
SHARED_MEMORY = {"sm90": 227 * 1024, "sm80": 163 * 1024}
EPILOGUE_HEADROOM = 16 * 1024

# Scratch block of P in the backward, in bytes: sized to stay in L2 (50 MB on
# H100/H200, 40 MB on A100) while the two GEMMs that consume it read it back.
P_BLOCK_BYTES = {"sm90": 32 * 2**20, "sm80": 16 * 2**20}
P_BLOCK_ROWS = 4096
# Under the interpreter: tiny blocks, so small test shapes span several of them.
INTERPRETER_P_BLOCK = (24, 40)

# Cap on the forward's row groups and column splits: the partial statistics
# take (groups * M + splits * N) * 8 bytes, independent of how large N gets
# relative to the tiles.
MAX_ROW_GROUPS = 32
MAX_COL_SPLITS = 32
# Programs per SM of the forward's persistent grid: 4-warp configs fit two
# CTAs per SM (one's exp epilogue overlaps the other's tensor-core work); the
# 8-warp ones (~240 registers a thread) fit one and run as two equal waves.
# Either way no wave is left half-empty.
PROGRAMS_PER_SM = 2
# Under the interpreter: a "GPU" of two SMs, so small shapes get several row
# groups and column splits.
INTERPRETER_SMS = 2


# --- the device ------------------------------------------------------------------

def arch(device: torch.device) -> str:
    """Architecture class of the device the kernels run on."""
    if device.type != "cuda":
        return "interpreter"
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> str:
    major, _ = torch.cuda.get_device_capability(index)
    return "sm90" if major == 9 else "sm80"


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def dtype_class(dtype: torch.dtype) -> str:
    """"half" (fp16/bf16 tensor cores), "tf32", "ieee" (exact fp32) or "fp64"."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    if dtype == torch.float64:
        return "fp64"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for features of ``dtype``: tf32 only for fp32 inputs
    when torch's float32 matmul precision allows it, exact ("ieee") otherwise."""
    return "tf32" if dtype_class(dtype) == "tf32" else "ieee"


def bucket(n: int) -> int:
    """Shape bucket for autotune keys: the next power of two, capped at 2^16."""
    return min(1 << (max(int(n), 1) - 1).bit_length(), 1 << 16)


# --- autotune configurations -------------------------------------------------------
#
# Two kernel shapes: "tile" kernels compute (BLOCK_M x BLOCK_N) tiles of S with a
# K-loop over D (forward statistics, backward P, similarity forward); "mm" kernels
# compute (BLOCK_R x BLOCK_D) tiles of P @ features with a K-loop over P's columns.

# The block sizes of each kernel shape: (rows, columns, K step) of its tiles.
BLOCK_NAMES = {"tile": ("BLOCK_M", "BLOCK_N", "BLOCK_K"), "mm": ("BLOCK_R", "BLOCK_D", "BLOCK_K")}


def _config(kind: str, rows: int, cols: int, k: int, warps: int, stages: int) -> triton.Config:
    """A triton.Config of a kernel shape from its block sizes, warps and pipeline stages."""
    return triton.Config(dict(zip(BLOCK_NAMES[kind], (rows, cols, k))), num_warps=warps, num_stages=stages)


# The candidates of both kernel shapes per (architecture, dtype class), each
# (rows, cols, K step, warps, stages) in the order of BLOCK_NAMES.
_CANDIDATES = {
    # The S tile and its exp epilogue live in registers: 128 x 128 fp32 over
    # 8 warps is 64 registers a thread for S and as many for exp(S).
    ("sm90", "half"): {"tile": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                                (64, 128, 64, 4, 4), (128, 128, 32, 8, 4)],
                       "mm": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)]},
    ("sm80", "half"): {"tile": [(128, 128, 32, 8, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)],
                       "mm": [(128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (64, 128, 32, 4, 4)]},
    ("sm90", "tf32"): {"tile": [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3)],
                       "mm": [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3)]},
    ("sm80", "tf32"): {"tile": [(128, 128, 16, 8, 3), (64, 64, 32, 4, 3)],
                       "mm": [(128, 128, 16, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3)]},
    # Exact fp32 and fp64 products run on FMA units, operands in registers:
    # short K steps keep them from spilling. 16 is the shortest: triton 3.6's
    # tl.dot rejects K < 16 for every dtype (MIN_DOT_K below).
    # The tiles: 64 x 64 over 4 warps gets a stack frame on sm80 (3.6 and 3.8) and
    # on sm90 under 3.6: 128 x 64 over 8 warps comes first (it never does).
    ("sm90", "ieee"): {"tile": [(128, 64, 16, 8, 2), (64, 64, 16, 4, 2)],
                       "mm": [(64, 64, 16, 4, 2), (32, 64, 16, 4, 2)]},
    ("sm80", "ieee"): {"tile": [(128, 64, 16, 8, 2)], "mm": [(64, 64, 16, 4, 2), (32, 64, 16, 4, 2)]},
    ("sm90", "fp64"): {"tile": [(32, 64, 16, 4, 2)], "mm": [(64, 64, 16, 4, 2)]},
    ("sm80", "fp64"): {"tile": [(32, 64, 16, 4, 2)], "mm": [(64, 64, 16, 4, 2)]},
}

# The same as triton.Configs: _CONFIGS[kind][(arch, dtype class)].
_CONFIGS = {kind: {key: [_config(kind, *c) for c in shapes[kind]] for key, shapes in _CANDIDATES.items()}
            for kind in BLOCK_NAMES}

# One fixed configuration under the interpreter: small and deliberately not
# square, so that a transposed index shows up as a wrong result.
_INTERPRETER_CONFIGS = {kind: [_config(kind, 16, 32, 16, 4, 1)] for kind in BLOCK_NAMES}

_ELEMENT_BYTES = {"half": 2, "tf32": 4, "ieee": 4, "fp64": 8}

# The smallest K of a tl.dot that every supported Triton compiles (3.6 asserts
# "K >= 16" for every dtype); tests/test_triton_backend.py checks every candidate.
MIN_DOT_K = 16


def shared_memory_bytes(kind: str, config: triton.Config, dclass: str) -> int:
    """Shared memory of the software pipeline: ``stages`` copies of both operand tiles."""
    rows, cols, k = (config.kwargs[name] for name in BLOCK_NAMES[kind])
    return config.num_stages * (rows + cols) * k * _ELEMENT_BYTES[dclass]


def configs(kind: str, arch_name: str, dclass: str) -> list[triton.Config]:
    """The autotune candidates of a kernel shape on an architecture, pruned to
    those whose pipeline fits the architecture's shared memory."""
    if arch_name == "interpreter":
        return list(_INTERPRETER_CONFIGS[kind])
    candidates = _CONFIGS[kind][(arch_name, dclass)]
    limit = SHARED_MEMORY[arch_name] - EPILOGUE_HEADROOM
    kept = [c for c in candidates if shared_memory_bytes(kind, c, dclass) <= limit]
    if not kept:  # the smallest one always runs; never leave autotune without a config
        kept = [min(candidates, key=lambda c: shared_memory_bytes(kind, c, dclass))]
    return kept


# Every autotuner built so far (benchmarks/bench_triton.py reports their choices).
TUNERS: list = []


def tuned(kernel, kind: str, device: torch.device, dtype: torch.dtype, key: tuple, restore: tuple = (),
          keep: str = "all"):
    """``kernel`` under triton.autotune with the candidates for this device and dtype.

    ``key`` names the kernel's shape-bucket arguments (and any constexpr that
    selects a variant worth tuning apart); ``restore`` the outputs
    a launch adds to or merges into (autotuning reruns a launch, so they are
    restored after each trial). Under ``torch.use_deterministic_algorithms(True)``
    only the first candidate runs: a choice made by timing could differ from
    one process to the next, and with it the order of the sums.
    ``keep``: "all" candidates; "block_k", those with the first one's BLOCK_K
    (kernels that must compute S in the same order of sums as each other);
    "first", the first alone.
    """
    return _autotuner(kernel, kind, arch(device), dtype_class(dtype), key, restore,
                      torch.are_deterministic_algorithms_enabled(), keep)


@functools.lru_cache(maxsize=None)
def _autotuner(kernel, kind, arch_name, dclass, key, restore, deterministic, keep="all"):
    # Built on first use, not at import: the pruning needs the device.
    candidates = configs(kind, arch_name, dclass)
    if keep == "block_k":
        candidates = [c for c in candidates if c.kwargs["BLOCK_K"] == candidates[0].kwargs["BLOCK_K"]]
    elif keep == "first":
        candidates = candidates[:1]
    tuner = triton.autotune(configs=candidates[:1] if deterministic else candidates, key=list(key),
                            restore_value=list(restore) or None)(kernel)
    TUNERS.append(tuner)
    return tuner


# --- host-side pieces shared by the launchers of every op ------------------------------

def tile_args(a: torch.Tensor, b: torch.Tensor, normalize: bool) -> dict:
    """The launch arguments, by keyword, that every S-tile kernel of the logsumexp and
    SigLIP ops (their forward and their backward's P kernel) takes under the same names:
    the features' strides and the constexprs that decide how a tile of S is computed.

    The kernels spell these parameters out each (a ``@triton.jit`` function binds its
    launch arguments by its own signature); their values are decided here once. A
    backward passes the whole ``a`` and ``b``: its blocks are row slices of them, with
    the same strides.
    """
    return dict(stride_an=a.stride(0), stride_ad=a.stride(1), stride_bm=b.stride(0), stride_bd=b.stride(1),
                NORMALIZE=normalize, IS_FP64=a.dtype == torch.float64, PRECISION=input_precision(a.dtype))


def inverse_norms(a: torch.Tensor, b: torch.Tensor, normalize: bool, dummy: torch.Tensor):
    """(ra, rb) when normalizing, else ``dummy`` twice (a pointer the kernels never read)."""
    if normalize:
        return inv_norms(a), inv_norms(b)
    return dummy, dummy


def blocks(length: int, size: int, *tensors):
    """[(start, stop, [views of each tensor's rows start:stop])] covering ``length`` rows
    (0-dim tensors, the unused inverse norms, and None, a rule that is off, are passed
    through): the backward's blocks of P, made once per call rather than once per block."""
    return [(start, min(length, start + size),
             [t[start:start + size] if t is not None and t.dim() else t for t in tensors])
            for start in range(0, length, size)]


def fp16_p_scale(a_dtype: torch.dtype, bound: torch.Tensor, ceiling: float) -> torch.Tensor:
    """sigma: for fp16 P, the power of two that brings ``bound`` (a device scalar
    bounding |P|) to at most ``ceiling``, so that sigma * P neither overflows nor
    underflows fp16; 1 for other dtypes, or when ``bound`` is 0 or not finite. A power
    of two keeps sigma * P and its undoing exact. Each op states its own bound."""
    one = torch.ones((), device=bound.device, dtype=bound.dtype)
    if a_dtype != torch.float16:
        return one
    usable = torch.isfinite(bound) & (bound > 0)
    return torch.where(usable, ceiling * torch.exp2(-torch.ceil(torch.log2(torch.where(usable, bound, one)))),
                       one)


# --- grid shapes -------------------------------------------------------------------

def forward_split(tiles_r: int, tiles_c: int, sms: int) -> tuple[int, int]:
    """(row groups, column splits) of the forward's persistent grid.

    Program (g, h) sweeps row blocks g, g + R, ... and, for each, column blocks
    h, h + C, ...; it keeps its row statistics in registers and merges its
    column statistics into its own row g of the column partials. Aim: at most
    PROGRAMS_PER_SM * sms programs (no half-empty last wave), every program
    with the same number of tiles to within one row or column block.
    """
    target = max(1, PROGRAMS_PER_SM * sms)
    groups = min(tiles_r, MAX_ROW_GROUPS, target)
    groups = triton.cdiv(tiles_r, triton.cdiv(tiles_r, groups))
    splits = max(1, min(tiles_c, MAX_COL_SPLITS, target // groups))
    splits = triton.cdiv(tiles_c, triton.cdiv(tiles_c, splits))
    return groups, splits


def forward_grid(n: int, m: int, device: torch.device):
    """The grid function of a persistent forward over an n x m matrix (forward_split)."""
    sms = num_sms(device)

    def split(meta):
        return forward_split(triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(m, meta["BLOCK_N"]), sms)

    return split


def tile_grid(rows: int, cols: int):
    """The grid function of one program per (BLOCK_M, BLOCK_N) tile of a rows x cols block."""
    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)
    return grid


def p_block(n: int, m: int, element_bytes: int, arch_name: str) -> tuple[int, int]:
    """(rows, columns) of the backward's scratch block of P."""
    if arch_name == "interpreter":
        rows, cols = INTERPRETER_P_BLOCK
    else:
        rows = P_BLOCK_ROWS
        cols = max(128, P_BLOCK_BYTES[arch_name] // (rows * element_bytes))
    return min(rows, n), min(cols, m)


# --- launching -------------------------------------------------------------------------

def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` through ``wrap_triton``, so torch.compile sees the kernel.

    Under the interpreter, wrap_triton hands back the kernel itself, which
    needs real memory: fake-tensor shape propagation (the fake kernel of a
    triton_op is its launcher run on fake tensors) skips the launch, since the
    caller allocated the outputs and only their metadata matters there; graph
    tracing, which would lose the kernel, is refused with an error that says so.
    """
    if INTERPRETING:
        tensors = [x for x in args if isinstance(x, torch.Tensor)]
        if _tracing(tensors):
            raise RuntimeError(
                "the triton backend cannot be traced (torch.compile, export, make_fx) under "
                "TRITON_INTERPRET=1: the interpreter runs kernels eagerly. Trace it on a GPU, or "
                "use backend='torch' on CPU")
        if any(torch._subclasses.fake_tensor.is_fake(x) for x in tensors):
            return
    wrap_triton(kernel)[grid](*args, **kwargs)


def _tracing(tensors) -> bool:
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None or any(isinstance(x, FunctionalTensor) for x in tensors)
