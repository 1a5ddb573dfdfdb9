"""The Triton backend as a whole, whichever op it runs: launch configurations and
grids, the fp32 matmul precision, int64 row offsets, availability and tracing
under the interpreter, the ahead-of-time compilation of every kernel, and the
supported Triton versions. The ops' own Triton tests: tests/test_triton_logsumexp.py,
tests/test_triton_normalized_similarity.py, tests/test_triton_siglip.py; the lanes
(interpreter, compiler, cuda): tests/triton_fixtures.py.
"""

import os

import pytest
import torch

import mmkernels
from loss_cases import CONTRASTIVE
from triton_fixtures import HAS_TRITON, compiler, interpreter, requires_triton

pytestmark = requires_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    import mmkernels.triton  # noqa: F401  (registers the kernels)
    from mmkernels.triton import _launch, logsumexp as lse_kernels


# --- interpreter lane ------------------------------------------------------------

@interpreter
def test_int64_row_offsets():
    """row * stride past 2^31 is computed in int64 (CPU memory cannot hold such a
    tensor here; the GPU test below runs one)."""

    @triton.jit
    def offsets_kernel(out_ptr, start, num_rows, stride, BLOCK: tl.constexpr):
        from mmkernels.triton.matmul import row_offsets
        rows = start + tl.arange(0, BLOCK)
        tl.store(out_ptr + tl.arange(0, BLOCK), row_offsets(rows, num_rows, stride))

    out = torch.empty(16, dtype=torch.int64)
    start, num_rows, stride = 2**21, 2**21 + 9, 4096
    offsets_kernel[(1,)](out, start, num_rows, stride, BLOCK=16)
    expected = [((start + k) % num_rows) * stride for k in range(16)]
    assert out.tolist() == expected and max(expected) > 2**31


@interpreter
def test_fp32_matmul_precision_setting_is_honoured():
    """fp32 inputs follow torch.get_float32_matmul_precision() (tf32 under "high")."""
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert _launch.input_precision(torch.float32) == "tf32"
        a, b = torch.randn(17, 12), torch.randn(17, 12)
        CONTRASTIVE.compare("triton", [a, b], torch.float32, scale=torch.tensor(5.0),
                            what="tf32 setting", normalize=True)  # the interpreter multiplies exactly
    finally:
        torch.set_float32_matmul_precision(previous)


@interpreter
def test_triton_available_on_cpu_under_the_interpreter():
    assert mmkernels.backends.why_unavailable("triton", torch.device("cpu")) is None
    assert "triton" in mmkernels.available_backends("cpu")


@interpreter
def test_tracing_under_the_interpreter_says_why_it_cannot():
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: mmkernels.contrastive_loss(a, b, backend="triton"), fullgraph=True)
    with pytest.raises(Exception, match="TRITON_INTERPRET"):
        fn(torch.randn(5, 3), torch.randn(5, 3))


# --- pure Python: configurations and grids -----------------------------------------

@pytest.mark.parametrize("arch", ["sm90", "sm80"])
@pytest.mark.parametrize("dclass", ["half", "tf32", "ieee", "fp64"])
@pytest.mark.parametrize("kind", ["tile", "mm"])
def test_configs_fit_the_architecture(arch, dclass, kind):
    configs = _launch.configs(kind, arch, dclass)
    assert configs
    limit = _launch.SHARED_MEMORY[arch] - _launch.EPILOGUE_HEADROOM
    assert all(_launch.shared_memory_bytes(kind, c, dclass) <= limit for c in configs)
    assert len({str(c) for c in configs}) == len(configs)


def test_deterministic_mode_keeps_to_the_first_candidate():
    """Timing-based choices could differ between processes (and with them the
    order of the sums): under torch.use_deterministic_algorithms(True) only the
    first candidate of each kernel runs."""
    kernel = lse_kernels._lse_fwd_kernel
    tuned = _launch._autotuner(kernel, "tile", "sm90", "half", ("N_KEY",), (), False)
    pinned = _launch._autotuner(kernel, "tile", "sm90", "half", ("N_KEY",), (), True)
    assert len(tuned.configs) > 1
    assert [str(c) for c in pinned.configs] == [str(tuned.configs[0])]
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert len(_launch.tuned(kernel, "tile", torch.device("cpu"), torch.float32, ("N_KEY",)).configs) == 1
    finally:
        torch.use_deterministic_algorithms(previous)


def test_interpreter_has_one_fixed_config():
    for kind in ("tile", "mm"):
        assert len(_launch.configs(kind, "interpreter", "half")) == 1


def test_configs_are_pruned_by_shared_memory(monkeypatch):
    monkeypatch.setitem(_launch.SHARED_MEMORY, "sm80", 60 * 1024)
    kept = _launch.configs("tile", "sm80", "half")
    every = _launch._CONFIGS["tile"][("sm80", "half")]
    assert 0 < len(kept) < len(every)


def test_dtype_classes_follow_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    try:
        for setting, expected in [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")]:
            torch.set_float32_matmul_precision(setting)
            assert _launch.dtype_class(torch.float32) == expected
        assert _launch.input_precision(torch.bfloat16) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert _launch.dtype_class(torch.bfloat16) == _launch.dtype_class(torch.float16) == "half"
    assert _launch.dtype_class(torch.float64) == "fp64"


@pytest.mark.parametrize("tiles_r,tiles_c,sms", [
    (512, 512, 132), (512, 8, 132), (8, 512, 132), (79, 79, 108), (1, 1, 132), (3, 5, 1), (1000, 3, 16)])
def test_forward_split_fills_the_gpu_evenly(tiles_r, tiles_c, sms):
    groups, splits = _launch.forward_split(tiles_r, tiles_c, sms)
    target = _launch.PROGRAMS_PER_SM * sms
    assert 1 <= groups <= min(tiles_r, _launch.MAX_ROW_GROUPS)
    assert 1 <= splits <= min(tiles_c, _launch.MAX_COL_SPLITS)
    assert groups * splits <= max(target, 1)
    # every program within one row block and one column block of the same work
    rows_each = [len(range(g, tiles_r, groups)) for g in range(groups)]
    cols_each = [len(range(h, tiles_c, splits)) for h in range(splits)]
    assert max(rows_each) - min(rows_each) <= 1 and max(cols_each) - min(cols_each) <= 1
    if tiles_r * tiles_c >= 4 * target:  # big problems use most of the GPU
        assert groups * splits >= target // 2


def test_p_block_fits_its_budget():
    for arch in ("sm90", "sm80"):
        for size in (2, 4, 8):
            rows, cols = _launch.p_block(10**6, 10**6, size, arch)
            assert rows * cols * size <= _launch.P_BLOCK_BYTES[arch]
    assert _launch.p_block(5, 3, 2, "sm90") == (5, 3)


def test_every_candidate_has_a_dot_k_every_supported_triton_compiles():
    """triton 3.6's tl.dot rejects K < 16 for every dtype (fp32 and fp64 included)."""
    for kind, table in _launch._CONFIGS.items():
        for (arch, dclass), candidates in table.items():
            for config in candidates:
                assert config.kwargs["BLOCK_K"] >= _launch.MIN_DOT_K, (kind, arch, dclass, config)


def test_buckets():
    assert [_launch.bucket(n) for n in (1, 7, 16, 17, 10**9)] == [1, 8, 16, 32, 1 << 16]


# --- ahead-of-time compilation (no GPU needed) --------------------------------------

@compiler
def test_kernels_compile_for_hopper_without_spills():
    """Every kernel of the backend, as its launcher calls it, compiled by Triton for
    sm90 with its first autotune candidate (tests/triton_aot.py does all of them)."""
    import triton_aot

    try:
        results = triton_aot.check(["sm90"], [torch.bfloat16], out=open(os.devnull, "w"))
    except (AttributeError, TypeError, ImportError) as error:  # Triton internals moved
        pytest.skip(f"triton {triton.__version__}: AOT internals differ ({error})")
    names = {r[0] for r in results}
    assert {"_lse_fwd_kernel", "_lse_merge_kernel", "_lse_bwd_p_kernel", "_products_kernel",
            "_similarity_fwd_kernel", "_siglip_fwd_kernel", "_siglip_bwd_p_kernel"} <= names
    for name, arch, dtype, config, usage in results:
        assert "error" not in usage, (name, config, usage)
        assert usage.get("local", 0) == 0 and usage.get("stack", 0) == 0, (name, config, usage)


# --- supported Triton versions (mmkernels/backends.py) ------------------------------

@pytest.mark.parametrize("found, ok", [("3.6.0", True), ("3.7.1", True), ("3.8.0", True), ("3.9.0", True),
                                       ("3.5.1", False), ("3.4.0", False), ("3.10.0", False)])
def test_triton_version_range(monkeypatch, found, ok):
    from mmkernels import backends

    monkeypatch.setattr(backends.importlib.metadata, "version", lambda name: found)
    problem = backends._triton_version_problem()
    assert (problem is None) == ok
    if not ok:
        assert found in problem and backends.TRITON_SUPPORTED_TEXT in problem


def test_triton_outside_the_range_auto_warns_once_and_named_raises(monkeypatch):
    """Outside the range: "auto" on CUDA passes over triton with one warning naming the
    versions; asking for triton raises with the same reason (never a compile error later)."""
    import warnings

    from mmkernels import backends

    reason = "triton 3.4.0 is installed; mmkernels' Triton kernels support triton >=3.6.0,<3.10"
    monkeypatch.setattr(backends, "_TRITON_VERSION_PROBLEM", reason)
    monkeypatch.setattr(backends, "_warned_triton_version", False)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="3.4.0.*>=3.6.0,<3.10"):
        assert backends.select_backend("auto", cuda) != "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select_backend("auto", cuda) != "triton"  # once per process
    with pytest.raises(RuntimeError, match="3.4.0"):
        backends.select_backend("triton", cuda)
