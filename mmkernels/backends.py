"""Backend names, availability, and the one function that picks a backend.

A backend is a family of kernels for the library's primitives (see
mmkernels/ops/logsumexp.py), registered in each op's kernel table
(mmkernels/ops/_registry.py). Every loss asks :func:`select_backend` for a
name and hands it to the primitive; the losses never know which kernels ran.

=========  =================================================================
name       what runs
=========  =================================================================
triton     Triton kernels (mmkernels/triton/); CUDA tensors, or CPU tensors
           under ``TRITON_INTERPRET=1`` (how CI checks them without a GPU)
cuda       CUDA C++ kernels of the extension ``mmkernels._C`` (csrc/cuda/)
cpu        C++ CPU kernels of the extension ``mmkernels._C`` (csrc/cpu/)
torch      tiled pure PyTorch: any device, never holds the N x M matrix
naive      materializes the N x M matrix: the reference and the baseline
=========  =================================================================

``"auto"`` takes the first available name of :data:`AUTO_ORDER` for the
tensors' device; the environment variable ``MMKERNELS_BACKEND`` overrides it.
A backend that is asked for by name (argument or variable) and cannot run
raises an error that names it and says why: never a silent fallback.

Everything here is plain Python over module-level facts, so torch.compile
traces through it with no graph break.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import warnings

import torch

from mmkernels import _extension

BACKENDS = ("triton", "cuda", "cpu", "torch", "naive")

# Best first, per device type; device types not listed get "torch".
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

ENV_VAR = "MMKERNELS_BACKEND"

# Facts fixed for the life of the process, read once at import.
_HAS_TRITON = importlib.util.find_spec("triton") is not None

# The Triton releases the kernels are compiled and tested on (.ci/triton_versions.sh
# compiles every kernel and candidate on the lowest and the highest, and runs the
# interpreter lane on both): >= 3.6.0 (torch 2.11's pin), < 3.10 (3.9.0 is torch 2.15's). Outside it a
# kernel may fail to compile at its first call, so "auto" skips triton instead.
TRITON_SUPPORTED = ((3, 6), (3, 10))
TRITON_SUPPORTED_TEXT = ">=3.6.0,<3.10"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def _triton_version_problem() -> str | None:
    """Why the installed Triton is outside the supported range, or None."""
    try:
        found = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # e.g. a source tree on sys.path
        return None
    low, high = TRITON_SUPPORTED
    if low <= _version_tuple(found)[:2] < high:
        return None
    return (f"triton {found} is installed; mmkernels' Triton kernels support triton "
            f"{TRITON_SUPPORTED_TEXT}")


_TRITON_VERSION_PROBLEM = _triton_version_problem() if _HAS_TRITON else None
_warned_triton_version = False


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    kind = device.type
    if name in ("torch", "naive"):
        return None
    if name == "triton":
        if not _HAS_TRITON:
            return "the package 'triton' is not installed"
        if _TRITON_VERSION_PROBLEM is not None:
            return _TRITON_VERSION_PROBLEM
        if kind == "cuda":
            return None
        if kind == "cpu":
            if _triton_interpreting():
                return None
            return ("Triton runs CPU tensors only under the interpreter: set "
                    "TRITON_INTERPRET=1 before triton is imported")
        return f"Triton kernels do not run on {kind} tensors"
    if name in ("cpu", "cuda"):
        built = _extension.cpu_built() if name == "cpu" else _extension.cuda_built()
        if not built:
            return (_extension.why_unavailable()
                    or f"the extension mmkernels._C was built without {name} kernels")
        if kind != name:
            return f"the {name} kernels need {name} tensors, got {kind} tensors"
        return None
    raise ValueError(f"backend: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")


def select_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` (a name or "auto") to the name of a backend that runs on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    requested_by = "backend"
    if backend == "auto":
        override = os.environ.get(ENV_VAR, "")
        if override and override != "auto":
            backend, requested_by = override, f"the environment variable {ENV_VAR}"
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if why_unavailable(name, device) is None:
                return name
            _warn_triton_version_once(name, device)
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(
            f"{requested_by}: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} (from {requested_by}) is unavailable: {reason}")
    return backend


def _warn_triton_version_once(name: str, device: torch.device) -> None:
    """One warning per process when "auto" passes over triton for its version only."""
    global _warned_triton_version
    if (name == "triton" and device.type == "cuda" and _TRITON_VERSION_PROBLEM is not None
            and not _warned_triton_version):
        _warned_triton_version = True
        warnings.warn(f"mmkernels: backend 'auto' skips triton: {_TRITON_VERSION_PROBLEM}",
                      RuntimeWarning, stacklevel=3)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends that can run here.

    With ``device`` (e.g. ``"cpu"``, ``"cuda"``): the backends that run on
    tensors of that device. Without: those that run on CPU tensors, plus those
    that run on CUDA tensors when a GPU is present. Best first.
    """
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cuda")] if torch.cuda.is_available() else []
        devices.append(torch.device("cpu"))
    names: list[str] = []
    for dev in devices:
        order = AUTO_ORDER.get(dev.type, ()) + ("triton", "torch", "naive")
        for name in order:
            if name not in names and why_unavailable(name, dev) is None:
                names.append(name)
    return names


def usable_in_process(name: str) -> bool:
    """Whether backend ``name`` can run on some device of this process (the CPU, and
    the GPU when one is present): ``import mmkernels`` registers its kernels then."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return any(why_unavailable(name, device) is None for device in devices)
