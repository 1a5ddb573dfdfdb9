"""A stand-in benchmark script for tests/test_benchmarks.py: implementations "ok1" and
"ok2" measure a tiny matmul; "crash" kills its process, as a CUDA error would."""

import os
import sys

import torch

from benchmarks._child import child_main
from benchmarks._results import Workload


def prepare(impl, case, device):
    if impl == "crash":
        os._exit(1)
    a = torch.randn(case.n, case.d, requires_grad=True)
    return Workload(forward=lambda: (a @ a.T).sum(), backward=lambda out: out.backward(),
                    zero_grad=lambda: setattr(a, "grad", None), inputs_bytes=0, grads_bytes=0)


if __name__ == "__main__":
    child_main(prepare, sys.argv[2])
