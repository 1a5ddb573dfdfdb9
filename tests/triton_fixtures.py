"""What the Triton test files share: where each test can run, the autotuning
fixture, and GPU inputs.

Three lanes, by where a test can run:

- ``interpreter``: kernels on CPU tensors under TRITON_INTERPRET=1. The
  interpreter lane runs the Triton test files in its own process
  (tests/test_triton_lane.py); in the main process (no interpreter) those tests
  skip, as triton cannot run CPU tensors there;
- ``compiler``: the ahead-of-time compilation of kernels for sm90/sm80 (main
  process only: the interpreter replaces the compiler); unmarked tests are
  pure Python (configs, grid splits, precision) and run in both;
- ``cuda`` (pytest's marker, skipped cleanly without a GPU): values and
  gradients at real sizes, memory, autotuning safety.

``requires_triton`` is every Triton test file's ``pytestmark``.
"""

import functools
import importlib.util
import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="kernels on CPU tensors run in the interpreter lane (tests/test_triton_lane.py)")
compiler = pytest.mark.skipif(INTERPRETING, reason="the interpreter replaces the compiler")


@pytest.fixture
def autotuning_trials(monkeypatch):
    """Two autotune candidates per kernel under the interpreter; yields the list of
    trials run. The first candidates have fewer row groups / larger tiles than the
    last ones tried. (The interpreter cannot time kernels: a stand-in benchmark
    runs each trial twice and ranks earlier candidates faster.)"""
    import triton

    from mmkernels.triton import _launch

    tile = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]
    mm = [triton.Config({"BLOCK_R": 32, "BLOCK_D": 32, "BLOCK_K": 16}),
          triton.Config({"BLOCK_R": 16, "BLOCK_D": 16, "BLOCK_K": 16})]
    trials = []

    def bench(fn, quantiles=None, **kwargs):
        trials.append(fn)
        fn()
        fn()
        return [float(len(trials))] * 3

    monkeypatch.setattr(_launch, "configs", lambda kind, arch, dclass: tile if kind == "tile" else mm)
    monkeypatch.setattr(triton, "autotune", functools.partial(triton.autotune, do_bench=bench))
    monkeypatch.setattr(_launch, "INTERPRETER_SMS", 8)
    _launch._autotuner.cache_clear()
    try:
        yield trials
    finally:
        _launch._autotuner.cache_clear()


def assert_fwd_bwd_memory_bounded(loss, n=32768, d=256):
    """Peak GPU memory of ``loss(a, b, normalize=True).backward()`` on (n, d) bf16
    features, beyond the inputs: the gradients, the contract's fp32 pb and pa (twice:
    room for the epilogue's copies), a P block and O(N) statistics or partials, never
    the N x N matrix. ``loss(a, b, **options)``; a smaller first call autotunes."""
    a, b = cuda_inputs(n, n, d, torch.bfloat16)
    a.requires_grad_()
    b.requires_grad_()
    loss(a[:1024], b[:1024]).backward()   # warm-up, autotune
    a.grad = b.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss(a, b, normalize=True).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = 2 * n * d * 2
    products = 2 * n * d * 4        # pb, pa in fp32 (kernel contract)
    allowance = grads + 2 * products + 64 * 2**20 + 512 * n
    assert extra < allowance, f"extra {extra / 2**20:.0f} MiB (S alone: {n * n * 2 / 2**20:.0f} MiB)"


def cuda_inputs(n, m, d, dtype, normalize_scale=1.0):
    """Features a (n, d) and b (m, d) on the GPU, the same for every call."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen) * normalize_scale
    b = torch.randn(m, d, device="cuda", dtype=dtype, generator=gen) * normalize_scale
    return a, b
