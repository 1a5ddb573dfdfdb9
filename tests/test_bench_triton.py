"""benchmarks/bench_triton.py's per-block timings replay the launches a real backward
makes; on CPU, under the Triton interpreter, check that the replays are the first
block's launches and that they run (the benchmark itself needs a GPU)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in a child: TRITON_INTERPRET must be set before triton is imported.
CHILD = r"""
import torch
from benchmarks.bench_triton import first_block
from mmkernels.triton import logsumexp as lse, siglip

n, d = 40, 24
a, b = torch.randn(n, d), torch.randn(n, d)
scale = torch.tensor(3.0)
row, col = lse.triton_lse_fwd(a, b, scale, True)
g = torch.full_like(row, 0.5 / n)
p_kernel, products = first_block(lambda: lse.triton_lse_bwd(a, b, scale, True, row, col, g, g),
                                 "_lse_bwd_p_kernel")
assert len(p_kernel()) == 1 and len(products()) >= 1
sig_p, _ = first_block(lambda: siglip.triton_siglip_bwd(a, b, scale, torch.tensor(-1.0), True, True, g),
                       "_siglip_bwd_p_kernel")
assert len(sig_p()) == 1
try:
    first_block(lambda: None, "_lse_bwd_p_kernel")
except ValueError:
    print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_first_block_replays_the_backwards_own_launches():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
