"""Resource gate of the CUDA kernels: nvcc compiles csrc/cuda/kernels.cu for
sm_80 and sm_90 with ``-Xptxas -v,--warn-on-spills``; every kernel must keep
its values in registers (no spill stores or loads, no stack frame) and its
static shared memory within 48 KiB.

``python tests/test_cuda_resources.py`` prints the table (the README's CUDA
section shows it).
"""

import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from cuda_emulation import lane

ARCHS = ("80", "90")
SMEM_LIMIT = 48 * 1024


def nvcc():
    home = lane.cuda_home()
    exe = home / "bin" / "nvcc" if home is not None else None
    return exe if exe is not None and exe.is_file() else None


pytestmark = pytest.mark.skipif(nvcc() is None, reason="needs nvcc (CUDA_HOME/bin/nvcc)")

ENTRY = re.compile(r"Compiling entry function '(?P<name>\S+)' for 'sm_(?P<arch>\d+)'")
FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
                   r"(?P<loads>\d+) bytes spill loads")
USED = re.compile(r"Used (?P<regs>\d+) registers")
SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


def ptxas_report(arch: str) -> str:
    """ptxas's -v output for kernels.cu on sm_<arch>, cached by source hash."""
    source = lane.KERNELS.read_bytes() + b"".join(path.read_bytes() for path in lane.HEADERS)
    version = subprocess.run([str(nvcc()), "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source + version.encode() + arch.encode()).hexdigest()[:16]
    cached = lane.cache_dir() / f"ptxas-sm{arch}-{key}.log"
    if cached.exists():
        return cached.read_text()
    out = lane.cache_dir() / f"ptxas-sm{arch}-{key}.o.{os.getpid()}"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(nvcc()), "-std=c++17", "-c", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v,--warn-on-spills", str(lane.KERNELS), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    out.unlink(missing_ok=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    cached.write_text(done.stderr + done.stdout)
    return cached.read_text()


def demangle(names):
    if shutil.which("c++filt") is None:
        return list(names)
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    short = []
    for full in done.stdout.splitlines():
        m = re.search(r"(\w+<[^()]*>)\(", full)  # void mmkernels::cuda::(anonymous namespace)::k<T>(...)
        name = m[1] if m else full
        short.append(name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
                     .replace("double", "fp64").replace("float", "fp32"))
    return short


def parse(report: str) -> list[dict]:
    """One row per kernel: name, arch, registers, stack, spill stores/loads, smem."""
    rows, current = [], None
    for line in report.splitlines():
        if m := ENTRY.search(line):
            current = {"mangled": m["name"], "arch": f"sm_{m['arch']}"}
            rows.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current.update({k: int(v) for k, v in m.groupdict().items()})
        elif current is not None and (m := USED.search(line)):
            current["regs"] = int(m["regs"])
            smem = SMEM.search(line)
            current["smem"] = int(smem["smem"]) if smem else 0
            current = None
    for row, name in zip(rows, demangle([r["mangled"] for r in rows])):
        row["kernel"] = name
    return rows


def resources() -> list[dict]:
    with ThreadPoolExecutor(len(ARCHS)) as pool:  # the two archs compile in parallel
        reports = list(pool.map(ptxas_report, ARCHS))
    return [row for report in reports for row in parse(report)]


def table(rows) -> str:
    lines = ["| kernel | arch | registers | stack | spill stores / loads | smem |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"])):
        lines.append(f"| `{r['kernel']}` | {r['arch']} | {r['regs']} | {r['stack']} | "
                     f"{r['stores']} / {r['loads']} | {r['smem']} |")
    return "\n".join(lines)


def test_no_kernel_spills_or_uses_local_memory():
    rows = resources()
    kernels = {r["kernel"] for r in rows}
    # 24 kernels of the unmasked ops, 9 masked instantiations of the primitive's (4 forward, 5 backward).
    assert len(rows) == 2 * len(kernels) >= 2 * 33, f"expected every kernel for both archs:\n{table(rows)}"
    bad = [r for r in rows if r["stack"] or r["stores"] or r["loads"] or r["smem"] > SMEM_LIMIT]
    assert not bad, "spills, local memory or too much shared memory:\n" + table(bad)
    print("\n" + table(rows))


if __name__ == "__main__":
    print(table(resources()))
