"""Benchmark of the symmetric CLIP loss (mmkernels.contrastive_loss) against baselines and peers.

    python -m benchmarks.bench_contrastive [--n 4096 8192] [--d 512] [--dtype float32]
                                           [--impl naive torch ...] [--device cpu] [--quick]

Forward + backward of the loss of L2-normalized features (normalize=True,
logit scale 1/0.07, gradients of both feature matrices and of the scale),
side by side in one run: naive (S materialized, open_clip's algorithm),
torch.compile(naive), every mmkernels backend available on the device, and
the peers that are installed (open_clip's ClipLoss; memeff and Inf-CL on
CUDA). See benchmarks/implementations.py for what each one runs, and
benchmarks/_child.py for how time and memory are measured. Each row also
reports ``rel_err``: the loss value's relative distance to mmkernels' torch
backend in fp32 on the same inputs (a peer that computed something else
would show it).
"""

from __future__ import annotations

import dataclasses

import torch

from benchmarks import implementations
from benchmarks._child import case_inputs
from benchmarks._results import Case, Workload
from benchmarks.suite import OpSuite, half_cases_cpu

SCALE = 1.0 / 0.07  # CLIP's initial logit scale


def default_cases(device: str, quick: bool) -> list[Case]:
    """The sizes of the default suite: CPU minutes on 2 cores; on GPU, bf16 and fp32 at
    D = 768, 512, 1024 and N = 8192, 32768, 65536."""
    if quick:
        return [Case(n, n, 64, "float32") for n in (1024, 2048)]
    if device == "cuda":
        # Most telling first (bf16, D = 768, growing N): a time budget cuts the tail.
        return [Case(n, n, d, dtype) for dtype in ("bfloat16", "float32") for d in (768, 512, 1024)
                for n in (8192, 32768, 65536)]
    # 16384: the size of the CPU targets (TARGETS below); bf16 and fp16 at 8192.
    return [Case(n, n, 512, "float32") for n in (2048, 4096, 8192, 16384)] + half_cases_cpu()


# --- targets ------------------------------------------------------------------------
#
# The performance targets of each backend, checked on the
# rows of the run that measured them (printed after the table; never asserted in
# unit tests). Per (device, impl): the case, and limits on "x floor" (time over
# the four matrix products measured in the same run), speed-up over the naive
# backend, and extra peak memory (MiB beyond inputs and gradients).

@dataclasses.dataclass(frozen=True)
class Target:
    device: str
    impl: str
    case: Case
    max_x_floor: float | None  # None: no limit (fp16's floor is torch.mm in fp16, far from BLAS)
    min_speedup_vs_naive: float
    max_extra_mib: float
    faster_than: str | None = None  # another implementation it must beat in the same run
    # Where the CPU kernels run these bf16 products (cpu_kernel_paths), the same
    # implementation in `than_dtype` must be at least `min_speedup_vs_dtype` x slower.
    products: str | None = None
    than_dtype: str | None = None
    min_speedup_vs_dtype: float = 0.0


TARGET_CASE_CPU = Case(16384, 16384, 512, "float32")
TARGETS = [
    # torch: within 1.3 x the floor, 1.8 x faster than naive, 512 MiB extra.
    Target("cpu", "torch", TARGET_CASE_CPU, 1.3, 1.8, 512),
    # cpu: 64 MiB + O(N*D) extra; O(N*D) counted as four fp32 N x D matrices
    # (normalized operands and gradient products), 128 MiB at this size.
    Target("cpu", "cpu", TARGET_CASE_CPU, 1.10, 2.0, 64 + 4 * 16384 * 512 * 4 / 2**20,
           faster_than="torch"),
    # bf16 on CPUs with AVX512-BF16 (no AMX): 1.5 x faster than the fp32 kernels, faster
    # than the torch backend and the materialized loss in bf16. The x-floor limit is
    # loose (the bf16 floor is oneDNN's, with bf16 results); docs/cpu-bf16.md. Extra
    # memory O(N*D): 64 MiB + eight fp32 N x D matrices (packed or converted operands,
    # fp32 gradient products, the gradients' conversion), 192 MiB at this size.
    Target("cpu", "cpu", Case(8192, 8192, 512, "bfloat16"), 2.0, 1.0, 64 + 8 * 8192 * 512 * 4 / 2**20,
           faster_than="torch", products="avx512_bf16", than_dtype="float32", min_speedup_vs_dtype=1.5),
    # fp16: fp32 products (exact); never slower than torch or the materialized loss.
    Target("cpu", "cpu", Case(8192, 8192, 512, "float16"), None, 1.0, 64 + 8 * 8192 * 512 * 4 / 2**20,
           faster_than="torch"),
]


def _cpu_products(dtype: str) -> str | None:
    from mmkernels import _extension
    if not _extension.cpu_built():
        return None
    from mmkernels import compiled
    return compiled.cpu_kernel_paths()[dtype]["products"]


def check_targets(rows: list[dict], device: str) -> list[str]:
    """One line per target of ``device`` whose case this run measured: the
    figures beside their limits, and whether every limit is met."""
    by_impl = {(r["impl"], r["n"], r["m"], r["d"], r["dtype"]): r for r in rows if r.get("status") == "ok"}
    lines = []
    for target in TARGETS:
        c = target.case
        row = by_impl.get((target.impl, c.n, c.m, c.d, c.dtype))
        if target.device != device or row is None:
            continue
        if target.products and _cpu_products(c.dtype) != target.products:
            continue
        checks = [("x floor", row.get("x_floor"), "<=", target.max_x_floor)] if target.max_x_floor else []
        checks += [("vs naive", row.get("speedup_vs_naive"), ">=", target.min_speedup_vs_naive),
                  ("extra MiB", row.get("extra_mib"), "<=", target.max_extra_mib)]
        if target.faster_than:
            other = by_impl.get((target.faster_than, c.n, c.m, c.d, c.dtype))
            ratio = other["total_median_ms"] / row["total_median_ms"] if other else None
            checks.append((f"vs {target.faster_than}", ratio, ">", 1.0))
        if target.than_dtype:
            other = by_impl.get((target.impl, c.n, c.m, c.d, target.than_dtype))
            ratio = other["total_median_ms"] / row["total_median_ms"] if other else None
            checks.append((f"vs {target.than_dtype}", ratio, ">=", target.min_speedup_vs_dtype))
        parts, met = [], True
        for name, value, op, limit in checks:
            ok = value is not None and (value <= limit if op == "<=" else
                                        value >= limit if op == ">=" else value > limit)
            met &= ok
            shown = "n/a" if value is None else f"{value:.2f}"
            parts.append(f"{name} {shown} {op} {limit:g} {'ok' if ok else 'MISSED'}")
        lines.append(f"target {target.impl} N={c.n} D={c.d} {c.dtype}: " + ", ".join(parts)
                     + f" -> {'met' if met else 'NOT met'}")
    return lines


# --- child: one implementation, one case ----------------------------------------

def prepare(impl: str, case: Case, device: str) -> Workload:
    import mmkernels

    a, b, _ = case_inputs(case, device)
    a.requires_grad_()
    b.requires_grad_()
    scale = torch.tensor(SCALE, device=device, requires_grad=True)
    loss_fn = implementations.contrastive_fn(impl, SCALE)

    def zero_grad():
        a.grad = b.grad = scale.grad = None

    def error(loss):
        with torch.no_grad():
            ref = mmkernels.contrastive_loss(a.float(), b.float(), scale, normalize=True, backend="torch")
        return (abs(float(loss) - float(ref)) / abs(float(ref)))

    feature_bytes = (a.numel() + b.numel()) * a.element_size()
    return Workload(forward=lambda: loss_fn(a, b, scale), backward=lambda loss: loss.backward(),
                    zero_grad=zero_grad, inputs_bytes=feature_bytes, grads_bytes=feature_bytes,
                    error=error,
                    note="no logit-scale gradient (fixed temperature)" if impl == "memeff" else "")


# --- the suite ------------------------------------------------------------------------

SUITE = OpSuite("benchmarks.bench_contrastive", __doc__, order=10, weight=4.0, op="contrastive",
                title="contrastive_loss forward + backward (normalize=True)", prepare=prepare,
                impls=implementations.contrastive_impls, cases=default_cases, report=check_targets)

if __name__ == "__main__":
    SUITE.main()
