"""Benchmark of the symmetric CLIP loss (mmkernels.contrastive_loss) against baselines and peers.

    python -m benchmarks.bench_contrastive [--n 4096 8192] [--d 512] [--dtype float32]
                                           [--impl naive torch ...] [--device cpu] [--quick]

Forward + backward of the loss of L2-normalized features (normalize=True,
logit scale 1/0.07, gradients of both feature matrices and of the scale),
side by side in one run: naive (S materialized, open_clip's algorithm),
torch.compile(naive), every mmkernels backend available on the device, and
the peers that are installed (open_clip's ClipLoss; memeff and Inf-CL on
CUDA). See benchmarks/implementations.py for what each one runs, and
benchmarks/harness.py for how time and memory are measured. Each row also
reports ``rel_err``: the loss value's relative distance to mmkernels' torch
backend in fp32 on the same inputs (a peer that computed something else
would show it).
"""

from __future__ import annotations

import torch

from benchmarks import harness, implementations
from benchmarks.harness import Case, SuiteOptions, Workload

MODULE = "benchmarks.bench_contrastive"
OP = "contrastive"
SCALE = 1.0 / 0.07  # CLIP's initial logit scale

# The entry point (python -m benchmarks) runs suites in SUITE_ORDER and gives
# each a share of a time budget proportional to SUITE_WEIGHT.
SUITE_ORDER = 10
SUITE_WEIGHT = 4.0


def default_cases(device: str, quick: bool) -> list[Case]:
    """The sizes of the default suite: CPU minutes on 2 cores; GPU issue 3's grid."""
    if quick:
        return [Case(n, n, 64, "float32") for n in (1024, 2048)]
    if device == "cuda":
        # Most telling first (bf16, D = 768, growing N): a time budget cuts the tail.
        return [Case(n, n, d, dtype) for dtype in ("bfloat16", "float32") for d in (768, 512, 1024)
                for n in (8192, 32768, 65536)]
    return [Case(n, n, 512, "float32") for n in (2048, 4096, 8192)]


# --- child: one implementation, one case ----------------------------------------

def prepare(impl: str, case: Case, device: str) -> Workload:
    import mmkernels

    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(case.n, case.d, device=device, dtype=dtype, generator=gen).requires_grad_()
    b = torch.randn(case.m, case.d, device=device, dtype=dtype, generator=gen).requires_grad_()
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


# --- parent ------------------------------------------------------------------------

def run(cases: list[Case], options: SuiteOptions) -> list[dict]:
    impls, notes = implementations.contrastive_impls(options.device, options.impls)
    return harness.run_op_suite(
        module=MODULE, op=OP, cases=cases, impls=impls, notes=notes, options=options,
        title="contrastive_loss forward + backward (normalize=True)",
        kind=implementations.kind, version=implementations.version)


def run_suite(options: SuiteOptions) -> list[dict]:
    """The default suite's part: the default sizes on the device."""
    return run(default_cases(options.device, options.quick), options)


def main(argv: list[str] | None = None) -> None:
    harness.script_main(__doc__, prepare, default_cases, run, argv)


if __name__ == "__main__":
    main()
