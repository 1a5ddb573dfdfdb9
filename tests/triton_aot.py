"""Compile the Triton kernels for sm80 and sm90 without a GPU, as their launchers would.

    python tests/triton_aot.py [--arch sm90 sm80] [--dtype bfloat16 float32] [--all-configs]
                               [--kernel _siglip_fwd_kernel ...]

The launchers run on small CPU tensors with the device facts patched to those
of the target (arch, SM count) and ``_launch.launch`` recording instead of
launching; every recorded call is then compiled by Triton's own compiler for
the target GPU (ptxas included), once per autotune candidate, with the
argument specialization a real launch would get. Prints, per kernel and
config, registers per thread, spilled bytes and shared memory (from
cuobjdump, when Triton bundles it): what one can know about a kernel's
speed without running it. Needs no GPU and no CUDA driver, but does use
Triton internals (checked with triton 3.8): tests/test_triton_backend.py and
tests/test_triton_siglip.py run it where the internals match.

Must not run under TRITON_INTERPRET=1 (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

TARGETS = {"sm90": 90, "sm80": 80}


@contextmanager
def recording(arch_name: str, sms: int = 132):
    """Run launchers on CPU tensors as if on ``arch_name``; yields the list of recorded calls."""
    from mmkernels.triton import _launch

    calls = []
    saved = (_launch.arch, _launch.num_sms, _launch.launch)
    _launch.arch = lambda device: arch_name
    _launch.num_sms = lambda device: sms
    _launch.launch = lambda kernel, grid, *args, **kwargs: calls.append((kernel, grid, args, kwargs))
    try:
        yield calls
    finally:
        _launch.arch, _launch.num_sms, _launch.launch = saved


def record_all(arch_name: str, dtype: torch.dtype, n: int = 8192, m: int = 8192, d: int = 768):
    """Every kernel launch of the triton backend's eight ops (both normalize modes; siglip's
    with and without positives on the diagonal; the masked primitive with every rule on)."""
    from mmkernels.ops import masked_logsumexp
    from mmkernels.triton import logsumexp, siglip, similarity

    a, b = torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(3.0, dtype=cdt)
    lse_r, lse_c = torch.randn(n, dtype=cdt), torch.randn(m, dtype=cdt)
    with recording(arch_name) as calls:
        for normalize in (False, True):
            logsumexp._forward(a, b, scale, normalize)
            logsumexp._backward(a, b, scale, normalize, lse_r, lse_c, torch.rand(n, dtype=cdt),
                                torch.rand(m, dtype=cdt))
        similarity._forward(a, b, scale)
        similarity._backward(a, b, scale, torch.randn(n, m, dtype=dtype))
        bias = torch.tensor(-10.0, dtype=cdt)
        for normalize, diagonal in ((False, True), (True, False)):
            siglip._forward(a, b, scale, bias, normalize, diagonal)
            siglip._backward(a, b, scale, bias, normalize, diagonal, torch.rand(n, dtype=cdt))
        # The masked primitive with every rule on: its largest variant.
        rules = masked_logsumexp.Exclusions.from_arguments(
            a, b, exclude_diagonal=True, positives=torch.full((n,), -1), row_groups=torch.arange(n) % 7,
            col_groups=torch.arange(m) % 7, row_threshold=torch.zeros(n, dtype=cdt),
            col_threshold=torch.zeros(m, dtype=cdt)).as_args()
        logsumexp._forward(a, b, scale, True, rules)
        logsumexp._backward(a, b, scale, True, lse_r, lse_c, torch.rand(n, dtype=cdt),
                            torch.rand(m, dtype=cdt), rules)
    return calls


# Where a masked P block lies in S: a value per block, specialized alike (multiples of 16).
_BLOCK_OFFSETS = ("row0", "col0")


def _unique(calls):
    """One call per (kernel, constexpr values): the blocks of a backward repeat themselves."""
    def kind(x):  # what a launch specializes on: a tensor's dtype, not its values
        return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__

    seen, out = set(), []
    for kernel, grid, args, kwargs in calls:
        key = (id(kernel),
               tuple(sorted((k, kind(v) if isinstance(v, torch.Tensor) else str(v))
                            for k, v in kwargs.items() if k not in _BLOCK_OFFSETS)),
               tuple(kind(x) for x in args))
        if key not in seen:
            seen.add(key)
            out.append((kernel, grid, args, kwargs))
    return out


def compile_call(kernel, args, kwargs, config, capability: int):
    """Compile ``kernel`` (a JITFunction) for ``args``/``kwargs`` + ``config`` on sm_<capability>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kw = dict(kwargs)
    if config is not None:
        kw.update(config.all_kwargs())
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound_args, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def resource_usage(compiled) -> dict:
    """Registers, spill bytes and static shared memory of a compiled kernel (cuobjdump)."""
    usage = {"shared": compiled.metadata.shared}
    tool = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return usage
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    for name, field in (("regs", "REG"), ("stack", "STACK"), ("local", "LOCAL")):
        found = re.search(rf"{field}:(\d+)", text)
        if found:
            usage[name] = int(found.group(1))
    return usage


def check(arch_names, dtypes, all_configs=False, out=sys.stdout, only=None):
    """Compile every recorded launch; returns [(kernel, arch, dtype, config, usage)].

    ``dtypes``: torch dtypes, or "tf32" for fp32 inputs under
    torch.set_float32_matmul_precision("high") (plain float32 follows the
    current setting). ``only``: names of the kernels to compile (default: all).
    """
    from triton.runtime.autotuner import Autotuner

    results = []
    for arch_name in arch_names:
        for dtype in dtypes:
            precision = torch.get_float32_matmul_precision()
            label = str(dtype).replace("torch.", "")
            if dtype == "tf32":
                dtype = torch.float32
                torch.set_float32_matmul_precision("high")
            try:
                calls = _unique(record_all(arch_name, dtype))
            finally:
                torch.set_float32_matmul_precision(precision)
            for kernel, _, args, kwargs in calls:
                if isinstance(kernel, Autotuner):
                    configs = kernel.configs if all_configs else kernel.configs[:1]
                    fn = kernel.fn
                else:
                    configs, fn = [None], kernel
                if only is not None and fn.__name__ not in only:
                    continue
                for config in configs:
                    try:
                        usage = resource_usage(compile_call(fn, args, kwargs, config, TARGETS[arch_name]))
                    except Exception as error:  # noqa: BLE001 - reported and counted, run goes on
                        first = str(error).strip().splitlines()
                        usage = {"error": f"{type(error).__name__}: {first[-1] if first else ''}"[:300]}
                    results.append((fn.__name__, arch_name, label, config, usage))
                    print(f"{arch_name} {label:9s} {fn.__name__:24s} {config} {usage}", file=out, flush=True)
    return results


def _check_group(group, all_configs, only):
    """check() for one (arch name, dtype name) pair; results without the config objects."""
    arch_name, dtype_name = group
    dtype = dtype_name if dtype_name == "tf32" else getattr(torch, dtype_name)
    return [(name, arch, label, str(config), usage)
            for name, arch, label, config, usage in check([arch_name], [dtype], all_configs,
                                                         only=only)]


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32", "tf32", "float64"],
                        help="torch dtype names, or tf32 (float32 under matmul precision 'high')")
    parser.add_argument("--all-configs", action="store_true", help="every autotune candidate, not the first")
    parser.add_argument("--kernel", nargs="+", help="only these kernels (e.g. _siglip_fwd_kernel)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="compile the (arch, dtype) groups in this many processes")
    ns = parser.parse_args()
    only = set(ns.kernel) if ns.kernel else None
    groups = [(arch, dtype) for arch in ns.arch for dtype in ns.dtype]
    if ns.jobs > 1:
        # Each group in its own process (ptxas and Triton's passes are single-threaded);
        # fork before the parent has run any torch op, so no thread pool is inherited.
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context
        with ProcessPoolExecutor(ns.jobs, mp_context=get_context("fork")) as pool:
            parts = pool.map(_check_group, groups, [ns.all_configs] * len(groups),
                             [only] * len(groups))
            results = [r for part in parts for r in part]
    else:
        results = [r for g in groups for r in _check_group(g, ns.all_configs, only)]
    failed = [r for r in results if "error" in r[4]]
    spills = [r for r in results if r[4].get("local", 0) or r[4].get("stack", 0)]
    import triton
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(results) - len(failed)} "
          f"kernels compiled, {len(failed)} failed, {len(spills)} with spills")
    for name, arch_name, label, config, usage in spills:
        print(f"  spill: {arch_name} {label} {name} {config} local={usage.get('local')} "
              f"stack={usage.get('stack')}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
