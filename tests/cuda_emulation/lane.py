"""Builds and runs the CUDA emulation lane: csrc/cuda/kernels.cu compiled by
g++ against tests/cuda_emulation/emu.h, linked with driver.cpp.

The kernel source is compiled unchanged but for one mechanical rewrite, in a
temporary copy: each ``kernel<<<grid, block, smem, stream>>>(`` becomes a call
of the emulated launcher, and the number of rewrites must equal the number of
``<<<`` in the source. Builds are cached by a hash of every input (sources,
flags, compiler), under $MMK_EMU_CACHE or ~/.cache/mmkernels-cuda-emu.
"""

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KERNELS = ROOT / "csrc" / "cuda" / "kernels.cu"
# Every header kernels.cu, bands.h and the driver include from csrc/ (the cache key).
HEADERS = [ROOT / "csrc" / "cuda" / "launch.h", ROOT / "csrc" / "cuda" / "bands.h",
           ROOT / "csrc" / "int_math.h"]
EMULATION = sorted(HERE.glob("*.h")) + sorted((HERE / "include").glob("*.h")) + [HERE / "driver.cpp"]

# The sanitizer variants: flags at build time, options at run time (a report
# ends the run with a non-zero status, so the test fails with it).
VARIANTS = {
    "plain": (["-O2"], {}),
    "asan": (["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=all"],
             {"ASAN_OPTIONS": "abort_on_error=0:exitcode=66:detect_leaks=1",
              "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}),
    "tsan": (["-O1", "-g", "-fsanitize=thread"],
             {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66:second_deadlock_stack=1"}),
}

LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)


def cuda_home():
    """The toolkit root with the real cuda_fp16.h / cuda_bf16.h, or None."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                      shutil.which("nvcc") and str(Path(shutil.which("nvcc")).resolve().parent.parent)):
        if candidate and (Path(candidate) / "include" / "cuda_bf16.h").is_file():
            return Path(candidate)
    return None


def compiler():
    return os.environ.get("CXX") or shutil.which("g++")


def rewrite_launches(source: str) -> str:
    """``k<<<cfg>>>(args)`` -> ``::mmk_emu::Launch("k", cfg)(k, args)``, every one of them."""
    expected = source.count("<<<")
    out, count = LAUNCH.subn(lambda m: f'::mmk_emu::Launch("{m[1]}", {m[2]})({m[1]}, ', source)
    if count != expected or "<<<" in out or ">>>" in out:
        raise RuntimeError(f"rewrote {count} of {expected} kernel launches in {KERNELS.name}")
    return out


def _digest(source: str, flags: list) -> str:
    h = hashlib.sha256()
    for path in HEADERS + EMULATION:
        h.update(path.name.encode() + path.read_bytes())
    h.update(source.encode())
    h.update(" ".join(flags).encode())
    h.update(subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("MMK_EMU_CACHE", Path.home() / ".cache" / "mmkernels-cuda-emu"))


def build(variant: str = "plain", source: str | None = None, tag: str = "") -> Path:
    """The driver executable for `variant`, built from kernels.cu (or `source`,
    a mutant of it) unless a build of the same inputs is cached."""
    home = cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit headers (set CUDA_HOME)")
    source = KERNELS.read_text() if source is None else source
    flags, _ = VARIANTS[variant]
    flags = ["-std=c++17", "-pthread", "-w", *flags, "-include", str(HERE / "emu.h"),
             f"-I{HERE / 'include'}", f"-I{home / 'include'}", f"-I{KERNELS.parent}"]
    exe = cache_dir() / f"driver-{variant}{tag}-{_digest(source, flags)}"
    if exe.exists():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=exe.parent) as tmp:
        copy = Path(tmp) / "kernels_emulated.cpp"
        copy.write_text(rewrite_launches(source))
        cmd = [compiler(), *flags, "-x", "c++", str(copy), str(HERE / "driver.cpp"), "-o", str(Path(tmp) / "exe")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"emulation build failed:\n{' '.join(cmd)}\n{done.stderr[-6000:]}")
        os.replace(Path(tmp) / "exe", exe)  # atomic: a concurrent build finds a whole file
    return exe


def run(exe: Path, variant: str, jobs: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs the cases of `jobs`; the caller checks returncode and reads stderr."""
    env = dict(os.environ, **VARIANTS[variant][1])
    return subprocess.run([str(exe), str(jobs)], capture_output=True, text=True, env=env, timeout=timeout)
