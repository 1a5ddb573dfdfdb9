"""Benchmark of the primitive, mmkernels.similarity_logsumexp: forward and backward.

    python -m benchmarks.bench_logsumexp [--n 4096] [--d 512] [--dtype float32] [--impl ...] [--quick]

``(row_lse, col_lse) = similarity_logsumexp(a, b, 1/0.07, normalize=True)``,
then the backward of both outputs with random upstream gradients (what every
loss of the library feeds it). Implementations: naive (torch.logsumexp of
the materialized S along both dimensions), torch.compile(naive), and every
mmkernels backend available on the device. Time and memory are measured as
in bench_contrastive (benchmarks/_child.py); ``rel_err`` is the largest
error of the two vectors against the torch backend in fp32, relative to
their largest magnitude.
"""

from __future__ import annotations

import torch

from benchmarks import implementations
from benchmarks._child import case_inputs
from benchmarks._results import Case, Workload
from benchmarks.suite import OpSuite, available

SCALE = 1.0 / 0.07


def impls_for(device: str, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    return available(["naive", "compile(naive)"] + implementations.mmkernels_backends(device), wanted)


# --- child ---------------------------------------------------------------------------

def prepare(impl: str, case: Case, device: str) -> Workload:
    import mmkernels

    a, b, gen = case_inputs(case, device)
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


# --- the suite ----------------------------------------------------------------------

SUITE = OpSuite("benchmarks.bench_logsumexp", __doc__, order=30, weight=1.0, op="logsumexp",
                title="similarity_logsumexp forward + backward (normalize=True)", prepare=prepare,
                impls=impls_for, quick_floor=False, quick_compile=False)

if __name__ == "__main__":
    SUITE.main()
