"""Input checks, done once at the public API boundary, before any kernel runs.

Every message names the argument and what was seen (shape, dtype, device),
so a user can fix the call without reading the library.
"""

from __future__ import annotations

import functools
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


class DTypeError(TypeError, ValueError):
    """A tensor of an unsupported dtype: both a TypeError and a ValueError,
    so callers may catch either (docs/api.md, "Errors")."""


def outside_autocast(fn):
    """Run a public op with torch.autocast off (CPU and CUDA): the autocast policy.

    Under autocast, ATen's O(N*D) ops (the positive logit's vecdot, the row
    sums of label smoothing, the norms) would run in bf16/fp16 while the
    kernels' logsumexp stays fp32; ``lse_i - S[i, i]`` then subtracts two
    differently rounded numbers and can go negative. So every public op
    ignores autocast: the features reach the kernels in their own dtype (an
    fp32 input stays fp32, a bf16 input stays bf16) and every O(N*D) term is
    computed in the kernels' precision (fp32; fp64 for fp64). Autocast still
    governs the user's model around the loss.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # Both device types: the op's device is only known after the checks,
        # and entering a disabled autocast costs nothing (no warning either).
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype for features of ``dtype``: fp64 stays fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_features(name: str, x) -> None:
    """A (rows, D) floating tensor with rows > 0 and D > 0."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor (rows, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (rows, D) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise DTypeError(
            f"{name}: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")


def check_pair(name_a: str, a, name_b: str, b, *, same_rows: bool) -> None:
    """Two feature matrices that can meet in one similarity matrix."""
    check_features(name_a, a)
    check_features(name_b, b)
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b}: tensors on different devices "
                         f"({a.device} and {b.device})")
    if a.dtype != b.dtype:
        raise DTypeError(f"{name_a} and {name_b}: dtypes differ ({a.dtype} and {b.dtype})")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b}: feature dimensions differ "
                         f"(shapes {tuple(a.shape)} and {tuple(b.shape)})")
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b}: batch sizes differ "
                         f"(shapes {tuple(a.shape)} and {tuple(b.shape)}); pairs need the same N")


def as_scalar_tensor(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A Python number or one-element tensor as a 0-dim tensor on ``like``'s
    device, in its compute dtype. Differentiable: gradients flow back to a
    tensor ``value``."""
    dtype = compute_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a number or a 0-dim tensor, got shape "
                             f"{tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise DTypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
        if value.device != like.device and value.device.type != "cpu":
            raise ValueError(f"{name}: on {value.device}, but the features are on {like.device}")
        return value.reshape(()).to(device=like.device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number or a 0-dim tensor, got {type(value).__name__}")
    return torch.tensor(float(value), device=like.device, dtype=dtype)


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def check_label_smoothing(label_smoothing) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing: expected a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing}")


def check_labels(labels, rows: int, classes: int, device: torch.device) -> None:
    """(rows,) int64 class indices in [0, classes) on ``device``.

    The range check reads the values (a device sync on GPU); under
    torch.compile it is skipped, as data-dependent checks cannot be traced.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise DTypeError(f"labels: expected dtype int64, got {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"labels: expected shape ({rows},), one per query row, "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels: on {labels.device}, but the features are on {device}")
    if not torch.compiler.is_compiling():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ValueError(f"labels: expected values in [0, {classes}) (one per key row), "
                             f"got values in [{low}, {high}]")
