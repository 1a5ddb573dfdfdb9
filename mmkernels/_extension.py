"""The compiled extension mmkernels._C (csrc/): loaded once, at package import.

It is optional: without it the cpu and cuda backends are unavailable and the
others run as usual.
"""

from __future__ import annotations

try:
    from mmkernels import _C  # noqa: F401  (registers the C++ kernels with the dispatcher)
except ImportError as error:  # not built, or built against another torch
    _C = None
    _WHY_NOT = f"the C++ extension mmkernels._C is not available ({error})"
else:
    _WHY_NOT = None


def cpu_built() -> bool:
    """True when the extension holds the C++ CPU kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CPU", False))


def cuda_built() -> bool:
    """True when the extension holds the CUDA C++ kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def why_unavailable() -> str | None:
    """Why the extension could not be loaded, or None when it was."""
    return _WHY_NOT
