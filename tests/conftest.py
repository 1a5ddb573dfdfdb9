"""Shared fixtures: which backends the reference lane runs, small tiles, the GPU marker.

``MMKERNELS_TEST_BACKENDS`` (comma-separated) overrides the backends under
test; the Triton lane sets it to "triton" in its own process, with
``TRITON_INTERPRET=1`` set before triton is imported (tests/test_triton_lane.py).
"""

import os

import pytest
import torch

import mmkernels
from mmkernels import _extension
from mmkernels.ops import _common


def backends_under_test() -> list[str]:
    chosen = os.environ.get("MMKERNELS_TEST_BACKENDS")
    if chosen:
        return [name.strip() for name in chosen.split(",") if name.strip()]
    # Triton on CPU tensors runs only in the interpreter lane (its own process).
    return [name for name in mmkernels.available_backends("cpu") if name != "triton"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=backends_under_test())
def backend(request):
    return request.param


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 x 16 for the torch backend (and the C++ CPU kernels), so small
    shapes straddle tile edges."""
    monkeypatch.setattr(_common, "TILE_SHAPE", {"cpu": (8, 16), "cuda": (8, 16)})
    if _extension.cpu_built():
        previous = _extension._C.set_cpu_tile_shape(8, 16)
        yield
        _extension._C.set_cpu_tile_shape(*previous)
    else:
        yield


@pytest.fixture(params=_extension._C.cpu_isas() if _extension.cpu_built() else [])
def isa(request):
    """Each instruction set of the C++ float tile kernels that this CPU runs."""
    previous = _extension._C.cpu_isa()
    _extension._C.set_cpu_isa(request.param)
    yield request.param
    _extension._C.set_cpu_isa(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
