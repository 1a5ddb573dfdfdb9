"""Shared benchmark utilities: timing statistics, the FLOP formula, peak memory,
and result rows stamped with where and when they were measured."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from statistics import median

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = RESULTS_DIR.parent.parent

# Where rows are appended: benchmarks/results/, unless the entry point (or a
# user) points this variable at another folder (the GPU script does).
RESULTS_ENV = "MMKERNELS_BENCH_RESULTS"
# One id shared by every row of one ``python -m benchmarks`` run (children inherit it).
RUN_ID_ENV = "MMKERNELS_BENCH_RUN"

# The FLOP formula, written once: each op is counted as the N x M x D matrix
# products (2*N*M*D FLOPs each) that its forward and backward cannot avoid.
# contrastive / logsumexp: S once forward; S again, dA and dB backward (4 in
# all: 8*N*M*D). normalized_similarity: S forward; dA and dB backward.
GEMMS = {
    "contrastive": {"fwd": 1, "bwd": 3},
    "logsumexp": {"fwd": 1, "bwd": 3},
    "similarity": {"fwd": 1, "bwd": 2},
    # SigLIP's tiles cost the same products as the logsumexp primitive's.
    "siglip": {"fwd": 1, "bwd": 3},
    # The mask adds compares, no product.
    "masked_logsumexp": {"fwd": 1, "bwd": 3},
    # multiple_negatives_loss: the primitive's four products per matrix, its cases' m
    # summing the candidate columns of every matrix (benchmarks/bench_embedding.py).
    "embedding": {"fwd": 1, "bwd": 3},
}


def op_flops(op: str, n: int, m: int, d: int, passes: str = "fwd+bwd") -> float:
    """FLOPs of ``op``'s GEMM floor for ``passes`` ("fwd", "bwd" or "fwd+bwd")."""
    gemms = GEMMS[op]
    count = gemms["fwd"] + gemms["bwd"] if passes == "fwd+bwd" else gemms[passes]
    return count * 2.0 * n * m * d


def contrastive_flops(n: int, m: int, d: int, passes: str = "fwd+bwd") -> float:
    """FLOPs of the GEMM floor of the contrastive primitive: one N x M x D matrix
    product (2*N*M*D) for the forward, three for the backward (recompute S, dA, dB)."""
    return op_flops("contrastive", n, m, d, passes)


def quantiles(samples: list[float]) -> dict:
    """Median and 20/80% quantiles (seconds) of timing samples."""
    ordered = sorted(samples)

    def q(p):
        k = (len(ordered) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"median_s": median(ordered), "q20_s": q(0.2), "q80_s": q(0.8), "samples": len(ordered)}


def time_cpu(fn, *, warmup: int = 1, reps: int = 3, max_seconds: float = 60.0) -> dict:
    """Wall-clock timing of ``fn()`` on CPU: warm-up runs, then up to ``reps`` timed runs
    (fewer if they would pass ``max_seconds``)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < reps and (not samples or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return quantiles(samples)


def time_cuda(fn) -> dict:
    """GPU timing with triton.testing.do_bench (L2 flushed between runs)."""
    import triton.testing

    ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return {"median_s": ms[0] / 1e3, "q20_s": ms[1] / 1e3, "q80_s": ms[2] / 1e3, "samples": None}


def rss_mib(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs), so a later peak is the step's own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the RSS before a measured
    step holds nothing a previous step left cached. No-op where unavailable."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_id() -> str:
    """The id of this benchmark run (set once by the entry point, inherited by children)."""
    if not os.environ.get(RUN_ID_ENV):
        os.environ[RUN_ID_ENV] = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + str(os.getpid())
    return os.environ[RUN_ID_ENV]


def results_dir() -> Path:
    """The folder rows are appended to (benchmarks/results/ unless $MMKERNELS_BENCH_RESULTS)."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS_DIR)


def environment(device: str | None = None) -> dict:
    """Where and when: device, versions, git sha, date, run id.

    ``device``: the device type measured ("cpu" or "cuda"); default: CUDA when present."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = device
    if device_type == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, cpu)"
        try:
            with open("/proc/cpuinfo") as info:
                for line in info:
                    if line.startswith("model name"):
                        device = f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores, cpu)"
                        break
        except OSError:
            pass
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import mmkernels

    cpu_kernels = None
    if device_type == "cpu":
        from mmkernels import _extension
        if _extension.cpu_built():
            from mmkernels import compiled
            # Which products and instruction set each dtype's CPU kernels run (docs/cpu-bf16.md).
            cpu_kernels = " ".join(f"{dtype}:{path['products']}/{path['elementwise']}"
                                   for dtype, path in compiled.cpu_kernel_paths().items() if dtype != "float64")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "mmkernels": mmkernels.__version__,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "threads": torch.get_num_threads(),
        "device_type": device_type,
        "cuda": torch.version.cuda,
        "cpu_kernels": cpu_kernels,
        "run_id": run_id(),
    }


def append_rows(name: str, rows: list[dict], folder: Path | None = None) -> tuple[Path, Path]:
    """Append rows to <folder>/<name>.jsonl and <name>.csv (folder: :func:`results_dir`);
    returns the paths."""
    folder = Path(folder) if folder is not None else results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, csv_path = folder / f"{name}.jsonl", folder / f"{name}.csv"
    with open(jsonl, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    fields = sorted({k for row in rows for k in row})
    new_file = not csv_path.exists()
    if not new_file:
        with open(csv_path) as f:
            existing = next(csv.reader(f), [])
        fields = existing + [k for k in fields if k not in existing]
        if fields != existing:  # a new column: rewrite the header with the old rows
            with open(csv_path) as f:
                old = list(csv.DictReader(f))
            with open(csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(old)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return jsonl, csv_path

