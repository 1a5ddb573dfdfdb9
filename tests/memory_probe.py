"""Peak resident memory of one contrastive_loss forward + backward, run as its own process.

    python tests/memory_probe.py BACKEND N D [DTYPE]

Prints one JSON line: the peak RSS added by the step beyond the inputs and
their gradients, in MiB. Run in a fresh process so nothing else inflates the
peak; the peak counter (VmHWM) is reset after warm-up through
/proc/self/clear_refs.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for benchmarks/

import mmkernels  # noqa: E402
from benchmarks.common import reset_peak_rss as reset_peak  # noqa: E402,F401
from benchmarks.common import rss_mib  # noqa: E402


def main():
    backend, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dtype = getattr(torch, sys.argv[4]) if len(sys.argv) > 4 else torch.float32

    def step(a, b):
        mmkernels.contrastive_loss(a, b, 10.0, normalize=True, backend=backend).backward()

    # Warm up code paths and allocator on a small problem.
    small = [torch.randn(64, d, dtype=dtype, requires_grad=True) for _ in range(2)]
    step(*small)
    del small

    a = torch.randn(n, d, dtype=dtype, requires_grad=True)
    b = torch.randn(n, d, dtype=dtype, requires_grad=True)
    inputs_and_grads = 2 * 2 * a.numel() * a.element_size() / 2**20
    base = rss_mib("VmRSS")
    reset_peak()
    step(a, b)
    peak = rss_mib("VmHWM")
    print(json.dumps({"backend": backend, "n": n, "d": d,
                      "extra_mib": peak - base - inputs_and_grads / 2,
                      "inputs_and_grads_mib": inputs_and_grads}))


if __name__ == "__main__":
    main()
