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

from benchmarks import implementations
from benchmarks._child import case_inputs
from benchmarks._results import Case, Workload
from benchmarks.suite import OpSuite, available

SCALE = 1.0 / 0.07
BASELINE = "unfused"


def impls_for(device: str, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    return available([BASELINE, f"compile({BASELINE})"] + implementations.mmkernels_backends(device), wanted)


def kind(name: str) -> str:
    return "baseline" if BASELINE in name else "mmkernels"


def unfused(a, b, scale):
    return scale * (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T)


# --- child ---------------------------------------------------------------------------

def prepare(impl: str, case: Case, device: str) -> Workload:
    import mmkernels

    dtype = getattr(torch, case.dtype)
    a, b, gen = case_inputs(case, device)
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


# --- the suite ----------------------------------------------------------------------

SUITE = OpSuite("benchmarks.bench_similarity", __doc__, order=40, weight=0.5, op="similarity",
                title="normalized_similarity forward + backward (fused vs F.normalize + matmul)",
                prepare=prepare, impls=impls_for, baseline=BASELINE, kind=kind,
                quick_floor=False, quick_compile=False)

if __name__ == "__main__":
    SUITE.main()
