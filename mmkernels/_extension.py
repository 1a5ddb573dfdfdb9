"""The compiled extension mmkernels._C (csrc/): loaded once, at package import.

It is optional: without it the cpu and cuda backends are unavailable and the
others run as usual. When it is missing or fails to load (not built, or built
against another torch), the import warns once, in one line, saying why;
``MMKERNELS_NO_EXT=1`` (the same switch that skips building it) skips loading
it and the warning.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch  # noqa: F401  (libtorch must be loaded before the extension)

NO_EXT_VAR = "MMKERNELS_NO_EXT"


class ExtensionWarning(UserWarning):
    """The compiled kernels are unavailable; the pure-Python backends run instead."""


def _load():
    if os.environ.get(NO_EXT_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        return None, f"the C++ extension mmkernels._C is disabled by {NO_EXT_VAR}"
    try:
        # Importing registers the C++ kernels with the dispatcher.
        module = importlib.import_module("mmkernels._C")
    except (ImportError, OSError) as error:
        why = f"the C++ extension mmkernels._C is not available ({error})"
        # No source location: the warning prints as this one line.
        warnings.warn_explicit(f"{why}; the cpu and cuda backends are off, the others run "
                               f"(set {NO_EXT_VAR}=1 to silence this)", ExtensionWarning,
                               filename="<mmkernels>", lineno=0, module="mmkernels")
        return None, why
    return module, None


_C, _WHY_NOT = _load()


def cpu_built() -> bool:
    """True when the extension holds the C++ CPU kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CPU", False))


def cuda_built() -> bool:
    """True when the extension holds the CUDA C++ kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def why_unavailable() -> str | None:
    """Why the extension could not be loaded, or None when it was."""
    return _WHY_NOT
