"""The Triton interpreter lane: every Triton kernel run on CPU tensors, in its own process.

TRITON_INTERPRET=1 must be set before triton is imported, so the lane is a
pytest subprocess with

- ``TRITON_INTERPRET=1``: the kernels run in Triton's interpreter (numpy);
- ``MMKERNELS_TEST_BACKENDS=triton``: the generic reference tests (every
  loss and the primitive against fp64: odd shapes, N = 1, D = 1, fp16/bf16,
  non-contiguous inputs, logit_scale 100 on unnormalized features, every
  gradient incl. logit_scale, gradcheck in fp64) run on the triton backend,
  siglip_loss's included (tests/test_siglip.py: its kernel contract on
  rectangular blocks with and without positives, open_clip's SigLipLoss) and
  the primitive with exclusions (tests/test_masked_logsumexp.py: every rule,
  rows with nothing left, ties, a frozen side);
- ``MMKERNELS_BACKEND=triton``: "auto" picks triton, so normalized_similarity
  (which has no backend argument) runs its Triton kernels;

and the Triton test files (tests/test_triton_backend.py, test_triton_logsumexp.py,
test_triton_normalized_similarity.py, test_triton_siglip.py), whose interpreter
tests force the kernels' internal paths. Compile tests are not part of the lane:
torch.compile cannot trace kernels the interpreter runs eagerly (tests/test_compile.py,
whose triton tests are marked cuda).

Run it alone: ``pytest -q tests/test_triton_lane.py`` (about 3 minutes on
two cores), or the lane's tests directly with the environment above.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
LANE = ["test_logsumexp.py", "test_masked_logsumexp.py", "test_contrastive.py",
        "test_normalized_similarity.py", "test_clip_loss.py", "test_siglip.py", "test_autocast.py",
        "test_triton_backend.py", "test_triton_logsumexp.py", "test_triton_normalized_similarity.py",
        "test_triton_siglip.py"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_interpreter_lane():
    env = dict(os.environ, TRITON_INTERPRET="1", MMKERNELS_TEST_BACKENDS="triton",
               MMKERNELS_BACKEND="triton",
               # numpy's OpenBLAS with its AVX kernels: block products (the interpreter's
               # tl.dot) summed in one order whatever the block shape, as on a GPU
               # (the FMA kernels of Haswell and Zen are not: test_triton_logsumexp.py ties)
               OPENBLAS_CORETYPE=os.environ.get("OPENBLAS_CORETYPE", "Sandybridge"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               # numpy warns about exp overflow in masked-off lanes, whose values are never stored
               "-W", "ignore::RuntimeWarning",
               *[str(TESTS / name) for name in LANE]]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"interpreter lane failed:\n{done.stdout[-8000:]}\n{done.stderr[-4000:]}"
    assert " passed" in done.stdout and " failed" not in done.stdout
