"""The CUDA C++ kernels of csrc/cuda/kernels.cu, executed on the CPU.

g++ compiles kernels.cu unchanged against the emulation layer of
tests/cuda_emulation/ (blocks of real threads, a real barrier, checked WMMA
fragments), and runs every launcher of launch.h through the host
orchestration of csrc/cuda/bands.h, against the fp64 references. The same
lane runs under AddressSanitizer + UndefinedBehaviorSanitizer and under
ThreadSanitizer (smaller shapes), and a mutant with a barrier removed must fail.
The masked primitive's kernels (the same launchers with exclusion rules) run
against a reference written from its rules (mmkernels/ops/masked_logsumexp.py).
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
    # The masked primitive (fwd, bwd): its rules on, a letter each (see RULES), "-" for none;
    # which of bwd's products (pb, pa) to compute.
    rules: str = "-"
    products: str = "11"

    @property
    def name(self):
        p = f"-P{NAMES[self.p_dtype]}" if self.p_dtype is not None else ""
        masked = f"-rules_{self.rules}-products{self.products}" if self.rules != "-" else ""
        return (f"{self.op}-{NAMES[self.dtype]}{p}-{self.n}x{self.m}x{self.d}-norm{int(self.normalize)}"
                f"-band{self.band_rows}-pos{int(self.positives)}{masked}")

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


# --- the masked primitive's rules ------------------------------------------------------

# The driver's letters: d exclude_diagonal, p positives (else none: no exemption),
# g row_groups + col_groups, r row_threshold, c col_threshold.
RULES = "dpgrc"


def between_logits(s: torch.Tensor) -> torch.Tensor:
    """Per row of the fp64 logits ``s``, a threshold in the widest gap between two
    of its middle logits: far from every logit, so that the kernel's rounding of S
    and the fp64 reference decide alike (ties are the torch-backed tests' subject)."""
    ordered = s.sort(dim=1).values
    k = s.shape[1]
    if k == 1:
        return ordered[:, 0] + 1.0
    lo, hi = k // 4, max(k // 4 + 1, 3 * k // 4)
    gaps = ordered[:, lo + 1:hi + 1] - ordered[:, lo:hi]
    at = gaps.argmax(dim=1, keepdim=True) + lo
    return ((ordered.gather(1, at) + ordered.gather(1, at + 1)) / 2).squeeze(1)


def write_rules(case: Case, a, b, g, extra: dict):
    """The rule tensors of ``case.rules`` into case.dir and ``extra``; with them a row
    (n // 2) and a column (m // 2) that lose every entry when their threshold is on."""
    n, m, acc = case.n, case.m, compute_of(case.dtype)
    s = reference.logits(a.double(), b.double(), case.scale, case.normalize)
    positives = torch.full((n,), -1, dtype=torch.int64)
    if "p" in case.rules:  # rectangular: row i's positive anywhere, every 4th row without one
        positives = torch.randint(0, m, (n,), generator=g)
        positives[::4] = -1
        positives[n // 2] = -1
        positives[positives == m // 2] = -1  # column m // 2: no positive to keep it
        save(case.dir / "positives.bin", positives)
    extra["positives"] = positives
    if "g" in case.rules:
        extra["row_groups"] = torch.randint(0, 5, (n,), generator=g)
        extra["col_groups"] = torch.randint(0, 5, (m,), generator=g)
    if "r" in case.rules:
        extra["row_threshold"] = between_logits(s).to(acc)
        extra["row_threshold"][n // 2] = -math.inf
    if "c" in case.rules:
        extra["col_threshold"] = between_logits(s.T).to(acc)
        extra["col_threshold"][m // 2] = -math.inf
    for name in ("row_groups", "col_groups", "row_threshold", "col_threshold"):
        if name in extra:
            save(case.dir / f"{name}.bin", extra[name])


def excluded(case: Case, x: dict):
    """(out_of_row, out_of_col): where an entry leaves its row's (column's)
    logsumexp, from the rules on the fp64 logits, entry by entry."""
    a, b = operands(case, x, torch.float64)
    s = reference.logits(a, b, case.scale, case.normalize)
    i, j = torch.arange(case.n)[:, None], torch.arange(case.m)[None, :]
    common = torch.zeros(case.n, case.m, dtype=torch.bool)
    if "d" in case.rules:
        common |= i == j
    if "g" in case.rules:
        common |= x["row_groups"][:, None] == x["col_groups"][None, :]
    out_of_row, out_of_col = common.clone(), common.clone()
    if "r" in case.rules:
        out_of_row |= s > x["row_threshold"].double()[:, None]
    if "c" in case.rules:
        out_of_col |= s > x["col_threshold"].double()[None, :]
    positive = j == x["positives"][:, None]  # -1: no column
    return out_of_row & ~positive, out_of_col & ~positive


def masked_lse(s: torch.Tensor, out_of_row, out_of_col):
    """(row_lse, col_lse) of ``s`` without the excluded entries; -inf where none is left."""
    return (torch.logsumexp(s.masked_fill(out_of_row, -math.inf), 1),
            torch.logsumexp(s.masked_fill(out_of_col, -math.inf), 0))


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
    if case.rules != "-":
        write_rules(case, a, b, g, extra)
    if case.op in ("bwd", "sbwd"):
        extra["g_row"] = torch.randn(case.n, generator=g, dtype=torch.float64).to(acc)
        extra["g_col"] = torch.randn(case.m, generator=g, dtype=torch.float64).to(acc)
        if case.rules != "-":
            s = reference.logits(a.double(), b.double(), case.scale, case.normalize)
            row_lse, col_lse = masked_lse(s, *excluded(case, extra))
        else:
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
            f"{p} {int(case.positives)} {case.dir} {case.rules} {case.products}\n")


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
    if case.rules != "-":
        return masked_expected(case, x, s, unit(a), unit(b))
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


def masked_expected(case: Case, x: dict, s, ah, bh) -> dict:
    """The masked primitive's outputs from the logits ``s`` in some dtype, with the
    entries decided on the fp64 logits (every dtype decides alike)."""
    out_of_row, out_of_col = excluded(case, x)
    if case.op == "fwd":
        return dict(zip(("row_lse", "col_lse"), masked_lse(s, out_of_row, out_of_col)))
    dtype = s.dtype
    # Selected, not multiplied: exp(s - lse) is inf where lse = -inf (all excluded).
    row_part = x["g_row"].to(dtype)[:, None] * torch.exp(s - x["row_lse"].to(dtype)[:, None])
    col_part = x["g_col"].to(dtype)[None, :] * torch.exp(s - x["col_lse"].to(dtype)[None, :])
    p = torch.where(out_of_row, 0.0, row_part) + torch.where(out_of_col, 0.0, col_part)
    out = {"p": p}
    if case.products[0] == "1":
        out["pb"] = p @ bh
    if case.products[1] == "1":
        out["pa"] = p.T @ ah
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
    out = {"p": read("p", (n, m), case.p_dtype)}
    if case.products[0] == "1":
        out["pb"] = read("pb", (n, d))
    if case.products[1] == "1":
        out["pa"] = read("pa", (m, d))
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
    assert got.keys() == ref.keys(), f"{case.name}: outputs {sorted(got)}, expected {sorted(ref)}"
    for key, value in ref.items():
        # A bf16 P is rounded once more than the inputs' own PyTorch result.
        dtype = torch.bfloat16 if case.p_dtype == torch.bfloat16 else case.dtype
        mine, theirs = got[key], same.get(key)
        if value.isinf().any():  # a statistic with every entry excluded: -inf, exactly
            assert torch.equal(mine.isinf(), value.isinf()) and (mine[mine.isinf()] < 0).all(), \
                f"{case.name}: {key}: -inf entries differ"
            finite = ~value.isinf()
            if not finite.any():
                continue
            mine, value = mine[finite], value[finite]
            theirs = theirs[finite] if theirs is not None else None
        assert_matches(mine, value, dtype, f"{case.name}: {key}", theirs, rtol=rtol)


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


# --- the masked primitive -------------------------------------------------------------

# Each rule alone (the diagonal without positives: nothing exempt), positives
# with a threshold, and every rule together; rectangular, straddling the tiles
# and (64-row bands) several bands.
MASKED_RULES = ["d", "g", "r", "c", "pr", RULES]
MASKED_SHAPES = [(65, 63, 17), (130, 67, 33)]


def masked_cases(dtype, shapes, rule_sets=MASKED_RULES):
    out = []
    for i, (n, m, d) in enumerate(shapes):
        p_types = [torch.bfloat16] if dtype == torch.bfloat16 else [compute_of(dtype)]
        for k, rules in enumerate(rule_sets):
            normalize = (i + k) % 2 == 0
            out.append(Case("fwd", dtype, n, m, d, normalize, 64, rules=rules))
            out += [Case("bwd", dtype, n, m, d, normalize, 64, p, rules=rules) for p in p_types]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=[NAMES[t] for t in DTYPES])
def test_emulated_masked_kernels(dtype, tmp_path):
    assert_lane_passes("plain", masked_cases(dtype, MASKED_SHAPES), tmp_path)


def test_emulated_masked_kernels_one_tile_and_one_entry(tmp_path):
    """A single entry (excluded: -inf both ways, unless it is the positive) and a tile's edge."""
    cases = [c for dtype in (torch.float32, torch.float16)
             for c in masked_cases(dtype, [(1, 1, 1), (64, 64, 16)], ["d", "dp", RULES])]
    assert_lane_passes("plain", cases, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_emulated_masked_frozen_side_equals_the_full_backward(dtype, tmp_path):
    """pb alone and pa alone: the full backward's, bit for bit, and nothing else written."""
    p_type = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    cases = [Case("bwd", dtype, 130, 67, 33, True, 64, p_type, rules=RULES, products=products)
             for products in ("11", "10", "01")]
    assert_lane_passes("plain", cases, tmp_path)
    full, pb_only, pa_only = (outputs(c) for c in cases)
    assert torch.equal(pb_only["pb"], full["pb"]) and torch.equal(pa_only["pa"], full["pa"])
    assert not (cases[1].dir / "pa.bin").exists() and not (cases[2].dir / "pb.bin").exists()


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_emulated_masked_kernels_under_sanitizer(variant, tmp_path):
    cases = [c for dtype in (torch.float32, torch.float16) for c in masked_cases(dtype, [(65, 63, 17)], [RULES])]
    assert_lane_passes(variant, cases, tmp_path)


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
