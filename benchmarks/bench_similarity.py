"""Benchmark of mmkernels.normalized_similarity (normalization fused) against F.normalize + matmul.

    python -m benchmarks.bench_similarity [--n 4096] [--d 512] [--dtype float32] [--impl ...] [--quick]

``S = logit_scale * normalize(a) @ normalize(b).T`` forward, then its
backward for a random upstream gradient. Implementations: ``unfused``
(``scale * F.normalize(a) @ F.normalize(b).T``: normalized copies of a and
b, then the product), torch.compile of it, and mmkernels' fused op on each
backend available on the device (chosen through MMKERNELS_BACKEND, the op
has no backend argument). S is this op's output, so every implementation
holds O(N*M); the fused op saves the normalized copies and their passes.
``rel_err``: the largest error of S against an fp32 unfused S, relative to
its largest magnitude.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from benchmarks import harness, implementations
from benchmarks.harness import Case, SuiteOptions, Workload

MODULE = "benchmarks.bench_similarity"
OP = "similarity"
SCALE = 1.0 / 0.07
SUITE_ORDER = 40
SUITE_WEIGHT = 0.5
BASELINE = "unfused"


default_cases = harness.secondary_cases


def impls_for(device: str, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    names = [BASELINE, f"compile({BASELINE})"] + implementations.mmkernels_backends(device)
    chosen = [n for n in names if wanted is None or n in wanted]
    notes = {n: "not available here" for n in (wanted or []) if n not in names}
    return chosen, notes


def kind(name: str) -> str:
    return "baseline" if BASELINE in name else "mmkernels"


def unfused(a, b, scale):
    return scale * (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T)


# --- child ---------------------------------------------------------------------------

def prepare(impl: str, case: Case, device: str) -> Workload:
    import mmkernels

    dtype = getattr(torch, case.dtype)
    a, b, gen = harness.case_inputs(case, device)
    a.requires_grad_()
    b.requires_grad_()
    scale = torch.tensor(SCALE, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(case.n, case.m, device=device, dtype=dtype, generator=gen)
    if impl == BASELINE:
        fn = unfused
    elif impl == f"compile({BASELINE})":
        fn = torch.compile(unfused, dynamic=True)
    else:
        os.environ["MMKERNELS_BACKEND"] = impl  # this child runs one implementation
        fn = mmkernels.normalized_similarity

    def zero_grad():
        a.grad = b.grad = scale.grad = None

    def error(s):
        with torch.no_grad():
            ref = unfused(a.float(), b.float(), scale.float())
            return float((s.float() - ref).abs().max()) / float(ref.abs().max())

    feature_bytes = (a.numel() + b.numel()) * a.element_size()
    return Workload(forward=lambda: fn(a, b, scale), backward=lambda s: s.backward(grad),
                    zero_grad=zero_grad, inputs_bytes=feature_bytes + grad.numel() * grad.element_size(),
                    grads_bytes=feature_bytes, error=error)


# --- parent --------------------------------------------------------------------------

def run(cases: list[Case], options: SuiteOptions) -> list[dict]:
    impls, notes = impls_for(options.device, options.impls)
    return harness.run_op_suite(
        module=MODULE, op=OP, cases=cases, impls=impls, notes=notes, options=options,
        title="normalized_similarity forward + backward (fused vs F.normalize + matmul)",
        baseline=BASELINE, kind=kind, version=implementations.version,
        floor=not options.quick)  # CI: bench_contrastive covers the floor


def run_suite(options: SuiteOptions) -> list[dict]:
    options = harness.without_compile_when_quick(options, impls_for(options.device, None)[0])
    return run(default_cases(options.device, options.quick), options)


def main(argv: list[str] | None = None) -> None:
    harness.script_main(__doc__, prepare, default_cases, run, argv)


if __name__ == "__main__":
    main()
