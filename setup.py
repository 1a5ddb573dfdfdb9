"""Build and install mmkernels.

The pure-Python package always installs. The compiled extension
mmkernels._C (C++ CPU kernels, CUDA kernels) is assembled by
``extension_modules()``: an empty list means a pure-Python install, where the
cpu and cuda backends report themselves unavailable.
"""

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def version() -> str:
    text = (ROOT / "mmkernels" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


# --- the compiled extension mmkernels._C (csrc/) -------------------------------
#
# Environment variables (README, "Building the extension"):
#   MMKERNELS_NO_EXT=1          build no extension: a pure-Python install
#   MMKERNELS_SKIP_CUDA=1       CPU kernels only, even where a CUDA toolkit is found
#   MMKERNELS_REQUIRE_EXT=1     fail the install if the extension does not build (CI)
#   MMKERNELS_CUDA_ARCH="8.0;9.0"  GPU architectures (else TORCH_CUDA_ARCH_LIST, else 8.0;9.0);
#                               "+PTX" on the last one also embeds PTX for newer GPUs
#   CUDA_HOME                   the CUDA toolkit's root (found from nvcc on the PATH if unset)
#   MAX_JOBS                    parallel compile jobs (ninja)
# Without REQUIRE, a failed CUDA build falls back to the CPU kernels, and a
# failed CPU build to a pure-Python install; the import then warns once.

DEFAULT_CUDA_ARCH = "8.0;9.0"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _note(message: str) -> None:
    print(f"mmkernels setup: {message}", file=sys.stderr)


def _locate_cuda_home() -> None:
    """Set CUDA_HOME from nvcc on the PATH when unset: torch guesses the folder
    above nvcc's, which is wrong when nvcc is a link or wrapper (/usr/local/bin)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    if nvcc:  # a wrapper script that execs the real nvcc
        text = Path(nvcc).read_bytes()[:4096]
        found = re.search(rb"(/\S+)/bin/nvcc", text)
        if found:
            candidates.append(Path(found.group(1).decode()))
    for root in candidates:
        if (root / "include" / "cuda_runtime.h").exists() and (root / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(root)
            return


def _cuda_arch_flags() -> list:
    """-gencode flags for MMKERNELS_CUDA_ARCH (or TORCH_CUDA_ARCH_LIST, or 8.0;9.0)."""
    spec = (os.environ.get("MMKERNELS_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST")
            or DEFAULT_CUDA_ARCH)
    flags = []
    for arch in re.split(r"[;\s,]+", spec.strip()):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        number = arch.removesuffix("+PTX").replace(".", "")
        if not re.fullmatch(r"\d+a?", number):
            raise ValueError(f"MMKERNELS_CUDA_ARCH: cannot read {arch!r} (expected e.g. 8.0;9.0+PTX)")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _sources(*folders: str) -> list:
    return [str(path.relative_to(ROOT)) for folder in folders
            for path in sorted((ROOT / folder).iterdir()) if path.suffix in (".cpp", ".cu")]


def _cpu_extension(cpp_extension):
    return cpp_extension.CppExtension(
        "mmkernels._C", _sources("csrc", "csrc/cpu"),
        # -fopenmp: at::parallel_for is inline and needs it to run in parallel
        # (it links the libgomp that torch already loaded). No -march: the SIMD
        # kernels pick their instruction set at run time (csrc/cpu/tile_ops.h).
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )


def _cuda_extension(cpp_extension):
    return cpp_extension.CUDAExtension(
        "mmkernels._C", _sources("csrc", "csrc/cpu", "csrc/cuda"),
        define_macros=[("MMKERNELS_WITH_CUDA", None)],
        extra_compile_args={"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3", *_cuda_arch_flags()]},
        extra_link_args=["-fopenmp"],
    )


def extension_modules() -> list:
    """The extension mmkernels._C: CPU kernels, plus the CUDA ones where torch is a
    CUDA build and a CUDA toolkit is present (a GPU is not needed to build)."""
    if _env_flag("MMKERNELS_NO_EXT"):
        return []
    _locate_cuda_home()
    try:
        from torch.utils import cpp_extension
        import torch
    except ImportError as error:
        if _env_flag("MMKERNELS_REQUIRE_EXT"):
            raise
        _note(f"torch is not importable ({error}): installing without the extension")
        return []
    if _env_flag("MMKERNELS_SKIP_CUDA"):
        return [_cpu_extension(cpp_extension)]
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found"
        _note(f"{why}: building the CPU kernels only")
        return [_cpu_extension(cpp_extension)]
    ext = _cuda_extension(cpp_extension)
    ext.cpu_fallback = _cpu_extension(cpp_extension)
    return [ext]


def build_ext_class():
    """torch's BuildExtension (ninja when installed), made optional: a failed
    build warns and falls back unless MMKERNELS_REQUIRE_EXT is set."""
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        from setuptools.command.build_ext import build_ext as BuildExtension

    class OptionalBuildExt(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # compiler, linker or toolkit errors alike
                if _env_flag("MMKERNELS_REQUIRE_EXT") or getattr(self, "_fallback_run", False):
                    raise
                fallbacks = [getattr(ext, "cpu_fallback", None) for ext in self.extensions]
                if not all(fallbacks):
                    _note(f"the extension failed to build ({error}); installing without it")
                    self.extensions = []
                    return
                _note(f"the CUDA kernels failed to build ({error}); building the CPU kernels only")
                for ext, cpu in zip(self.extensions, fallbacks):
                    # In place: setuptools has already annotated these objects.
                    for field in ("sources", "include_dirs", "library_dirs", "libraries",
                                  "define_macros", "extra_compile_args", "extra_link_args"):
                        setattr(ext, field, getattr(cpu, field))
                self._fallback_run = True
                self.compiler = None  # a fresh compiler: BuildExtension patched this one
                try:
                    self.run()  # inside run(), which copies the result in place afterwards
                except Exception as cpu_error:
                    if _env_flag("MMKERNELS_REQUIRE_EXT"):
                        raise
                    _note(f"the extension failed to build ({cpu_error}); installing without it")
                    self.extensions = []

    return OptionalBuildExt


EXTRAS = {
    # webdataset (with braceexpand) and pandas: what open_clip_train, the trainer in
    # open_clip_torch's wheel (3.3.0 here), imports; tests/test_open_clip_train.py runs
    # it. open_clip_torch's own "training" extra would add sentencepiece, unused here.
    "test": ["pytest>=7", "pytest-timeout", "open_clip_torch>=2.20", "transformers>=4.40",
             "sentence-transformers>=6", "webdataset>=0.2.5,<=0.2.86", "pandas"],
    "bench": ["matplotlib", "tqdm"],
    # peers the benchmarks compare against, when installed (Triton kernels: CUDA only)
    "peers": ["memeff", "inf_cl"],
    "train": ["pillow", "tqdm", "matplotlib", "transformers>=4.40"],  # transformers: --hf-model
    # The Triton releases the triton backend supports (mmkernels/backends.py
    # TRITON_SUPPORTED, tested by .ci/triton_versions.sh). torch's CUDA wheels
    # pin their own: torch 2.11 -> triton 3.6.0, torch 2.14 -> 3.8.0, torch 2.15 -> 3.9.0. Outside the
    # range "auto" skips the triton backend with a warning.
    "triton": ["triton>=3.6.0,<3.10"],
}

setup(
    name="mmkernels",
    version=version(),
    description="Memory-efficient fused kernels for contrastive multimodal (CLIP) training",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["mmkernels", "mmkernels.*"]),
    install_requires=["torch>=2.6", "numpy"],
    extras_require=EXTRAS,
    ext_modules=extension_modules(),
    cmdclass={"build_ext": build_ext_class()},
    entry_points={"console_scripts": ["mmkernels-train=mmkernels.train:main"]},
)
