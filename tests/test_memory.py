"""Memory: fwd+bwd of the tiled loss adds O(N*D), never the N x N matrix.

Measured as peak RSS in a fresh subprocess (tests/memory_probe.py). At
N = 16384, D = 256, fp32, S alone is 1 GiB; the tiled path must add less
than 256 MiB beyond the inputs and their gradients.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import backends_under_test

PROBE = Path(__file__).with_name("memory_probe.py")
ROOT = PROBE.parent.parent
TILED = [name for name in backends_under_test() if name in ("torch", "cpu")]


def extra_peak_mib(backend: str, n: int, d: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(PROBE), backend, str(n), str(d)], env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("backend", TILED)
def test_tiled_memory_is_o_n_d(backend):
    extra = extra_peak_mib(backend, 16384, 256)
    assert extra < 256, f"{backend}: fwd+bwd added {extra:.0f} MiB of peak RSS (S alone is 1024 MiB)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_probe_sees_the_materialized_matrix():
    """The same probe on the naive backend sees S: the measurement can fail."""
    extra = extra_peak_mib("naive", 8192, 64)   # S is 256 MiB here
    assert extra > 256, f"naive added only {extra:.0f} MiB: the probe is not measuring"
