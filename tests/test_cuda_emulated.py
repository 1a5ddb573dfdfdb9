"""The CUDA C++ kernels of csrc/cuda/kernels.cu, executed on the CPU.

g++ compiles kernels.cu unchanged against the emulation layer of
tests/cuda_emulation/ (blocks of real threads, a real barrier, checked WMMA
fragments), and runs every launcher of launch.h through the host
orchestration of csrc/cuda/bands.h, against the fp64 references. The same
lane runs under AddressSanitizer + UndefinedBehaviorSanitizer and under
ThreadSanitizer (smaller shapes), and a mutant with a barrier removed must fail.
"""

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import reference
from cuda_emulation import lane
from tolerances import assert_matches, fp32_logit_rtol

pytestmark = pytest.mark.skipif(
    lane.cuda_home() is None or lane.compiler() is None,
    reason="needs g++ and the CUDA toolkit's headers (CUDA_HOME with include/cuda_bf16.h)")

NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}
DTYPES = list(NAMES)


def compute_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def inv_norms(x):
    """As csrc/common.cpp computes them, in the compute dtype."""
    return torch.linalg.vector_norm(x, 2, dim=1, dtype=compute_of(x.dtype)).clamp_min(1e-12).reciprocal()


def scaled_operand(x, normalize, dtype):
    out = x.to(compute_of(x.dtype))
    if normalize:
        out = out * inv_norms(x).unsqueeze(1)
    return out.to(dtype).contiguous()


def save(path: Path, t: torch.Tensor):
    path.write_bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def load(path: Path, dtype, shape):
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=dtype).reshape(shape)


@dataclass
class Case:
    op: str               # fwd, bwd, sfwd, sbwd, sim
    dtype: torch.dtype
    n: int
    m: int
    d: int
    normalize: bool
    band_rows: int = 0    # 0: the default band length
    p_dtype: torch.dtype | None = None
    positives: bool = True
    seed: int = 0
    dir: Path = field(default=None)

    @property
    def name(self):
        p = f"-P{NAMES[self.p_dtype]}" if self.p_dtype is not None else ""
        return (f"{self.op}-{NAMES[self.dtype]}{p}-{self.n}x{self.m}x{self.d}-norm{int(self.normalize)}"
                f"-band{self.band_rows}-pos{int(self.positives)}")

    @property
    def scale(self):
        # CLIP's initial logit scale when normalized; 100 (its cap) on raw inputs.
        return 1 / 0.07 if self.normalize else 100.0

    bias = -10.0


def cases_for(dtype, shapes, bands=(0, 64)):
    out = []
    for i, (n, m, d) in enumerate(shapes):
        band = bands[i % len(bands)]
        for normalize in (True, False):
            p_types = [torch.float32, torch.bfloat16] if dtype == torch.bfloat16 else [compute_of(dtype)]
            out.append(Case("fwd", dtype, n, m, d, normalize, band))
            for p in p_types:
                out.append(Case("bwd", dtype, n, m, d, normalize, band, p))
                out.append(Case("sbwd", dtype, n, m, d, normalize, band, p, positives=normalize))
            out.append(Case("sfwd", dtype, n, m, d, normalize, positives=not normalize or n == m))
        out.append(Case("sim", dtype, n, m, d, True))
    return out


# Straddling the 64 x 64 tiles, the 16-deep (fp32/fp64) and 32-deep (fp16/bf16)
# K slices, and (with 64-row bands) several bands of the forward and backward.
SHAPES = [(1, 1, 1), (63, 65, 15), (65, 63, 100), (130, 65, 15), (130, 130, 33)]
# Under the sanitizers, every path at a tenth of the cost.
SANITIZER_SHAPES = [(1, 1, 1), (65, 63, 17), (130, 1, 33)]


def write_inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    acc = compute_of(case.dtype)
    d = case.d
    a = (torch.randn(case.n, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(case.dtype)
    b = (torch.randn(case.m, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(case.dtype)
    save(case.dir / "a.bin", a)
    save(case.dir / "b.bin", b)
    if case.normalize:
        save(case.dir / "ra.bin", inv_norms(a))
        save(case.dir / "rb.bin", inv_norms(b))
    save(case.dir / "scale.bin", torch.tensor([case.scale], dtype=acc))
    save(case.dir / "bias.bin", torch.tensor([case.bias], dtype=acc))
    extra = {"a": a, "b": b}
    if case.op in ("bwd", "sbwd"):
        extra["g_row"] = torch.randn(case.n, generator=g, dtype=torch.float64).to(acc)
        extra["g_col"] = torch.randn(case.m, generator=g, dtype=torch.float64).to(acc)
        row_lse, col_lse = reference.logsumexp(a.double(), b.double(), case.scale, case.normalize)
        extra["row_lse"], extra["col_lse"] = row_lse.to(acc), col_lse.to(acc)
        for name in ("g_row", "g_col", "row_lse", "col_lse"):
            save(case.dir / f"{name}.bin", extra[name])
        save(case.dir / "ah.bin", scaled_operand(a, case.normalize, case.p_dtype))
        save(case.dir / "bh.bin", scaled_operand(b, case.normalize, case.p_dtype))
    return extra


def job_line(case: Case) -> str:
    p = NAMES[case.p_dtype or case.dtype]
    return (f"{case.op} {NAMES[case.dtype]} {case.n} {case.m} {case.d} {int(case.normalize)} {case.band_rows} "
            f"{p} {int(case.positives)} {case.dir}\n")


# --- the definitions, in any dtype (fp64 for the reference, the input dtype for PyTorch's own) ----------

def operands(case, x, dtype):
    return x["a"].to(dtype), x["b"].to(dtype)


def positives_mask(case, dtype):
    eye = torch.eye(case.n, case.m, dtype=dtype)
    return eye if case.positives else torch.zeros_like(eye)


def expected(case: Case, x: dict, dtype) -> dict:
    """What the driver writes, from the definitions computed in `dtype`."""
    a, b = operands(case, x, dtype)
    s = reference.logits(a, b, case.scale, case.normalize)
    unit = (lambda t: F.normalize(t, dim=-1)) if case.normalize else (lambda t: t)
    if case.op == "fwd":
        row, col = reference.logsumexp(a, b, case.scale, case.normalize)
        return {"row_lse": row, "col_lse": col}
    if case.op == "sim":
        return {"out": s}
    z = 2 * positives_mask(case, dtype) - 1
    xs = s + case.bias
    if case.op == "sfwd":
        return {"row_loss": F.softplus(-z * xs).sum(1)}
    g_row = x["g_row"].to(dtype)
    if case.op == "bwd":
        p = (g_row[:, None] * torch.exp(s - x["row_lse"].to(dtype)[:, None])
             + x["g_col"].to(dtype)[None, :] * torch.exp(s - x["col_lse"].to(dtype)[None, :]))
    else:
        p = g_row[:, None] * (torch.sigmoid(xs) - positives_mask(case, dtype))
    out = {"p": p, "pb": p @ unit(b), "pa": p.T @ unit(a)}
    if case.op == "sbwd":
        out["p_row"] = p.sum(1)
    return out


def outputs(case: Case) -> dict:
    acc = compute_of(case.dtype)
    read = lambda name, shape, dtype=acc: load(case.dir / f"{name}.bin", dtype, shape)  # noqa: E731
    n, m, d = case.n, case.m, case.d
    if case.op == "fwd":
        col = read("col_max", (m,)) + read("col_sum", (m,)).log()
        return {"row_lse": read("row_lse", (n,)), "col_lse": col}
    if case.op == "sim":
        return {"out": read("out", (n, m), case.dtype)}
    if case.op == "sfwd":
        return {"row_loss": read("row_loss", (n,))}
    out = {"p": read("p", (n, m), case.p_dtype), "pb": read("pb", (n, d)), "pa": read("pa", (m, d))}
    if case.op == "sbwd":
        out["p_row"] = read("p_row", (n,))
    return out


def check(case: Case, x: dict):
    got = outputs(case)
    ref = expected(case, x, torch.float64)
    same = expected(case, x, case.dtype) if case.dtype not in (torch.float32, torch.float64) else {}
    a, b = operands(case, x, torch.float64)
    rtol = None
    if case.dtype == torch.float32:
        rtol = fp32_logit_rtol(reference.logits(a, b, case.scale, case.normalize).abs().max().item())
    for key, value in ref.items():
        # A bf16 P is rounded once more than the inputs' own PyTorch result.
        dtype = torch.bfloat16 if case.p_dtype == torch.bfloat16 else case.dtype
        assert_matches(got[key], value, dtype, f"{case.name}: {key}", same.get(key), rtol=rtol)


def run_lane(variant: str, cases: list, tmp_path: Path, exe: Path | None = None):
    exe = exe or lane.build(variant)
    inputs = []
    for i, case in enumerate(cases):
        case.dir = tmp_path / f"case{i}"
        case.dir.mkdir()
        inputs.append(write_inputs(case))
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(job_line(case) for case in cases))
    done = lane.run(exe, variant, jobs)
    return done, inputs


def assert_lane_passes(variant, cases, tmp_path):
    done, inputs = run_lane(variant, cases, tmp_path)
    assert done.returncode == 0, f"the {variant} lane failed (status {done.returncode}):\n{done.stderr[-8000:]}"
    for case, x in zip(cases, inputs):
        check(case, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=[NAMES[t] for t in DTYPES])
def test_emulated_kernels(dtype, tmp_path):
    assert_lane_passes("plain", cases_for(dtype, SHAPES), tmp_path)


def sanitizer_cases():
    return [c for dtype in DTYPES for c in cases_for(dtype, SANITIZER_SHAPES[dtype == torch.float32:], bands=(64,))]


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_emulated_kernels_under_sanitizer(variant, tmp_path):
    assert_lane_passes(variant, sanitizer_cases(), tmp_path)


def test_every_launch_is_rewritten():
    source = lane.KERNELS.read_text()
    assert source.count("<<<") == 7  # the 6 launchers, 2 of them for merge_col_stats
    assert "::mmk_emu::Launch(" in lane.rewrite_launches(source)
    with pytest.raises(RuntimeError, match="rewrote"):
        lane.rewrite_launches(source + "\nint x = 1 <<<2;\n")


def mutant_without_barrier() -> str:
    """kernels.cu without the barrier that ends SimtTile's slice loop (before
    the next slice overwrites the operands other threads still read)."""
    source = lane.KERNELS.read_text()
    marker = "__syncthreads();  // before the next slice"
    assert source.count(marker) == 1
    return source.replace(marker, "// barrier removed: before the next slice")


def test_mutant_without_barrier_fails_under_tsan(tmp_path):
    exe = lane.build("tsan", mutant_without_barrier(), tag="-mutant")
    cases = [Case("sim", torch.float32, 65, 65, 33, True)]
    done, _ = run_lane("tsan", cases, tmp_path, exe)
    assert done.returncode != 0, "TSan did not see the removed barrier"
    assert "data race" in done.stderr, done.stderr[-4000:]


def test_build_cache_reuses_the_executable():
    first = lane.build("plain")
    assert lane.build("plain") == first and first.is_file()


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm")
def test_static_shared_memory_fits_48k():
    """Static __shared__ (function statics in the emulation) of each kernel <= 48 KiB."""
    import subprocess
    exe = lane.build("plain")
    symbols = subprocess.run(["nm", "-S", "-C", str(exe)], capture_output=True, text=True).stdout
    per_kernel = {}
    for line in symbols.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and "_kernel<" in parts[3] and ")::" in parts[3]:
            kernel = parts[3].rsplit(")::", 1)[0]
            per_kernel[kernel] = per_kernel.get(kernel, 0) + int(parts[1], 16)
    assert per_kernel, "no __shared__ arrays found in the emulated kernels"
    too_big = {k: v for k, v in per_kernel.items() if v > 48 * 1024}
    assert not too_big, too_big
