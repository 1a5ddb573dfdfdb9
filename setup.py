"""Build and install mmkernels.

The pure-Python package always installs. The compiled extension
mmkernels._C (C++ CPU kernels, CUDA kernels) is assembled by
``extension_modules()``: an empty list means a pure-Python install, where the
cpu and cuda backends report themselves unavailable.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def version() -> str:
    text = (ROOT / "mmkernels" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def extension_modules() -> list:
    """The C++/CUDA extension modules to build (none yet: csrc/ is empty)."""
    return []


EXTRAS = {
    "test": ["pytest>=7", "pytest-timeout", "open_clip_torch>=2.20", "transformers>=4.40"],
    "bench": ["matplotlib", "tqdm"],
    # peers the benchmarks compare against, when installed (Triton kernels: CUDA only)
    "peers": ["memeff", "inf_cl"],
    "train": ["pillow", "tqdm", "matplotlib"],
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
    entry_points={"console_scripts": ["mmkernels-train=mmkernels.train:main"]},
)
