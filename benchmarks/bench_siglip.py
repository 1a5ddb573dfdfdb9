"""Benchmark of siglip_loss: time, TFLOP/s and peak memory per implementation.

    python -m benchmarks.bench_siglip [--n 4096 8192] [--d 512] [--dtype float32]
                                      [--impl naive torch open_clip ...] [--quick]

Forward + backward of SigLIP's sigmoid loss on L2-normalized features with
SigLIP's initial logit scale 10 and bias -10 (Zhai et al., 2023); gradients
of both feature matrices, the scale and the bias. Implementations: naive (the
N x N logits materialized), every mmkernels backend available on the device,
and open_clip's ``SigLipLoss`` when open_clip is installed. Time and memory
are measured as in bench_contrastive (benchmarks/_child.py); the tiled
backends' memory is flat in N beyond the features: the "extra MiB" column.
``rel_err``: the loss value against mmkernels' torch backend in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import implementations
from benchmarks._child import case_inputs
from benchmarks._results import Case, Workload
from benchmarks.suite import OpSuite, available

SCALE, BIAS = 10.0, -10.0


def impls_for(device: str, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    names = ["naive"] + implementations.mmkernels_backends(device)
    notes = {}
    reason = implementations.peer_unavailable("open_clip", device)
    if reason:
        notes["open_clip"] = reason
    else:
        names.append("open_clip")
    chosen, missing = available(names, wanted)
    return chosen, {**notes, **missing}


# --- child ---------------------------------------------------------------------------

def _loss_fn(impl: str):
    import mmkernels

    if impl == "open_clip":
        from open_clip.loss import SigLipLoss

        return SigLipLoss()
    return lambda a, b, scale, bias: mmkernels.siglip_loss(a, b, scale, bias, backend=impl)


def prepare(impl: str, case: Case, device: str) -> Workload:
    import mmkernels

    a, b, _ = case_inputs(case, device)
    # Normalized once, outside the timed step, as open_clip's model returns them.
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    a.requires_grad_()
    b.requires_grad_()
    scale = torch.tensor(SCALE, device=device, requires_grad=True)
    bias = torch.tensor(BIAS, device=device, requires_grad=True)
    loss_fn = _loss_fn(impl)

    def zero_grad():
        a.grad = b.grad = scale.grad = bias.grad = None

    def error(loss):
        with torch.no_grad():
            ref = mmkernels.siglip_loss(a.float(), b.float(), scale, bias, backend="torch")
        return abs(float(loss) - float(ref)) / abs(float(ref))

    feature_bytes = (a.numel() + b.numel()) * a.element_size()
    return Workload(forward=lambda: loss_fn(a, b, scale, bias), backward=lambda loss: loss.backward(),
                    zero_grad=zero_grad, inputs_bytes=feature_bytes, grads_bytes=feature_bytes,
                    error=error)


# --- the suite ----------------------------------------------------------------------

SUITE = OpSuite("benchmarks.bench_siglip", __doc__, order=50, weight=1.0, op="siglip",
                title=f"siglip_loss forward + backward (scale {SCALE}, bias {BIAS})", prepare=prepare,
                impls=impls_for, quick_floor=False)

if __name__ == "__main__":
    SUITE.main()
