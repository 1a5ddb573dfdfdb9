"""Benchmark of the primitive, mmkernels.similarity_logsumexp: forward and backward.

    python -m benchmarks.bench_logsumexp [--n 4096] [--d 512] [--dtype float32] [--impl ...] [--quick]

``(row_lse, col_lse) = similarity_logsumexp(a, b, 1/0.07, normalize=True)``,
then the backward of both outputs with random upstream gradients (what every
loss of the library feeds it). Implementations: naive (torch.logsumexp of
the materialized S along both dimensions), torch.compile(naive), and every
mmkernels backend available on the device. Time and memory are measured as
in bench_contrastive (benchmarks/harness.py); ``rel_err`` is the largest
error of the two vectors against the torch backend in fp32, relative to
their largest magnitude.
"""

from __future__ import annotations

import torch

from benchmarks import harness, implementations
from benchmarks.harness import Case, SuiteOptions, Workload

MODULE = "benchmarks.bench_logsumexp"
OP = "logsumexp"
SCALE = 1.0 / 0.07
SUITE_ORDER = 30
SUITE_WEIGHT = 1.0


default_cases = harness.secondary_cases


def impls_for(device: str, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    names = ["naive", "compile(naive)"] + implementations.mmkernels_backends(device)
    chosen = [n for n in names if wanted is None or n in wanted]
    notes = {n: "not available here" for n in (wanted or []) if n not in names}
    return chosen, notes


# --- child ---------------------------------------------------------------------------

def prepare(impl: str, case: Case, device: str) -> Workload:
    import mmkernels

    a, b, gen = harness.case_inputs(case, device)
    a.requires_grad_()
    b.requires_grad_()
    scale = torch.tensor(SCALE, device=device, requires_grad=True)
    g_row = torch.rand(case.n, device=device, generator=gen)
    g_col = torch.rand(case.m, device=device, generator=gen)
    backend = "naive" if impl == "compile(naive)" else impl

    def lse(a, b, scale):
        return mmkernels.similarity_logsumexp(a, b, scale, normalize=True, backend=backend)

    fn = torch.compile(lse, dynamic=True) if impl == "compile(naive)" else lse

    def zero_grad():
        a.grad = b.grad = scale.grad = None

    def error(out):
        with torch.no_grad():
            ref = mmkernels.similarity_logsumexp(a.float(), b.float(), scale, normalize=True, backend="torch")
        worst = max(float((o - r).abs().max()) for o, r in zip(out, ref))
        return worst / max(float(r.abs().max()) for r in ref)

    feature_bytes = (a.numel() + b.numel()) * a.element_size()
    return Workload(forward=lambda: fn(a, b, scale),
                    backward=lambda out: torch.autograd.backward(out, (g_row, g_col)),
                    zero_grad=zero_grad, inputs_bytes=feature_bytes + (case.n + case.m) * 4,
                    grads_bytes=feature_bytes, error=error)


# --- parent --------------------------------------------------------------------------

def run(cases: list[Case], options: SuiteOptions) -> list[dict]:
    impls, notes = impls_for(options.device, options.impls)
    return harness.run_op_suite(
        module=MODULE, op=OP, cases=cases, impls=impls, notes=notes, options=options,
        title="similarity_logsumexp forward + backward (normalize=True)",
        kind=implementations.kind, version=implementations.version,
        floor=not options.quick)  # CI: bench_contrastive covers the floor


def run_suite(options: SuiteOptions) -> list[dict]:
    options = harness.without_compile_when_quick(options, impls_for(options.device, None)[0])
    return run(default_cases(options.device, options.quick), options)


def main(argv: list[str] | None = None) -> None:
    harness.script_main(__doc__, prepare, default_cases, run, argv)


if __name__ == "__main__":
    main()
