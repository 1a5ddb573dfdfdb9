"""Benchmark of the primitive with exclusions against the unmasked primitive, same run.

    python -m benchmarks.bench_masked [--n 16384] [--d 512] [--dtype float32] [--impl ...] [--quick]

``similarity_logsumexp(a, b, 1/0.07, normalize=True, **rules)`` forward and
backward (random upstream gradients on both outputs), with every rule on:
``exclude_diagonal`` (positives shifted by one row, as a query-query term's
are elsewhere), groups of two duplicates, and per-row and per-column
thresholds at the positive logit + 0.1 (false-negative filtering). The same
call without rules is measured beside it on every backend: ``BACKEND:masked``
against ``BACKEND:unmasked`` is the cost of the mask (target: at most 1.10x).
``BACKEND:masked-frozen-b``: the same with ``b`` a constant (a locked tower): its
backward skips one of the four products (target: at most 0.80x of ``BACKEND:masked``);
``BACKEND:unmasked-frozen-b`` likewise without rules (against ``BACKEND:unmasked``).
``naive``: the masked primitive on the materialized S. ``rel_err``: against
the torch backend's masked result in fp32.
"""

from __future__ import annotations

import torch

from benchmarks import implementations
from benchmarks._child import case_inputs
from benchmarks._results import Case, Workload
from benchmarks.suite import OpSuite, available

SCALE = 1.0 / 0.07
MARGIN = 0.1


def impls_for(device: str, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    from mmkernels.ops import masked_logsumexp

    names = ["naive"]
    for backend in implementations.mmkernels_backends(device):
        if backend in masked_logsumexp.KERNELS:
            names += [f"{backend}:masked", f"{backend}:masked-frozen-b"]
        names.append(f"{backend}:unmasked")
        if backend in masked_logsumexp.KERNELS:
            names.append(f"{backend}:unmasked-frozen-b")
    return available(names, wanted)


def rules_for(a: torch.Tensor, b: torch.Tensor, scale: float) -> dict:
    """Every rule on, from O(N*D) work: positives shifted by one, groups of two,
    thresholds at the positive logit + MARGIN."""
    n = a.shape[0]
    positives = (torch.arange(n, device=a.device) + 1) % b.shape[0]
    with torch.no_grad():
        an = torch.nn.functional.normalize(a.float(), dim=1)
        bn = torch.nn.functional.normalize(b.float(), dim=1)
        positive_logit = scale * torch.linalg.vecdot(an, bn[positives])
    groups = torch.arange(n, device=a.device) // 2
    return dict(exclude_diagonal=True, positives=positives, row_groups=groups,
                col_groups=torch.arange(b.shape[0], device=a.device) // 2,
                row_threshold=positive_logit + MARGIN, col_threshold=positive_logit + MARGIN)


# --- child ---------------------------------------------------------------------------

def prepare(impl: str, case: Case, device: str) -> Workload:
    import mmkernels

    a, b, gen = case_inputs(case, device)
    backend, _, variant = impl.partition(":")
    a.requires_grad_()
    b.requires_grad_(not variant.endswith("frozen-b"))
    scale = torch.tensor(SCALE, device=device, requires_grad=True)
    g_row = torch.rand(case.n, device=device, generator=gen)
    g_col = torch.rand(case.m, device=device, generator=gen)
    rules = rules_for(a.detach(), b.detach(), SCALE)
    call_rules = {} if variant.startswith("unmasked") else rules

    def forward():
        return mmkernels.similarity_logsumexp(a, b, scale, normalize=True, backend=backend, **call_rules)

    def zero_grad():
        a.grad = b.grad = scale.grad = None

    def error(out):
        with torch.no_grad():
            ref = mmkernels.similarity_logsumexp(a.float(), b.float(), scale, normalize=True,
                                                 backend="torch", **call_rules)
        finite = [torch.isfinite(r) for r in ref]
        worst = max(float((o - r)[f].abs().max()) for o, r, f in zip(out, ref, finite))
        return worst / max(float(r[f].abs().max()) for r, f in zip(ref, finite))

    def backward(out):
        # rows or columns with everything excluded are -inf: give them no upstream gradient
        grads = [g.masked_fill(torch.isinf(o.detach()), 0.0) for g, o in zip((g_row, g_col), out)]
        torch.autograd.backward(out, grads)

    feature_bytes = (a.numel() + b.numel()) * a.element_size()
    return Workload(forward=forward, backward=backward, zero_grad=zero_grad,
                    inputs_bytes=feature_bytes + (case.n + case.m) * 4,
                    grads_bytes=sum(x.numel() * x.element_size() for x in (a, b) if x.requires_grad),
                    error=error)


# --- the suite ----------------------------------------------------------------------

SUITE = OpSuite("benchmarks.bench_masked", __doc__, order=35, weight=0.5, op="masked_logsumexp",
                title="similarity_logsumexp with every exclusion rule vs without (normalize=True)",
                prepare=prepare, impls=impls_for, quick_floor=False, quick_compile=False)

if __name__ == "__main__":
    SUITE.main()
