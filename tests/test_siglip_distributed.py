"""SigLipLoss with world_size > 1: gloo processes on 127.0.0.1 against the single-process
fp64 result and open_clip's SigLipLoss run the same way (tests/siglip_distributed_worker.py).

World sizes 2, 3 and 4 cover open_clip's schedules: a single shift, bidirectional
rounds only, and bidirectional rounds plus a final shift.
"""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import backends_under_test

pytest.importorskip("open_clip.loss")
dist = pytest.importorskip("torch.distributed")

WORKER = Path(__file__).with_name("siglip_distributed_worker.py")
ROOT = WORKER.parent.parent
# Triton runs CPU tensors only in its interpreter lane; the ring itself is backend-agnostic.
BACKENDS = [name for name in backends_under_test() if name != "triton"] or ["torch"]


def _run_group(world: int) -> list[dict]:
    # The test holds the rendezvous store on a port the OS picked: no port races.
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True,
                          timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), str(WORKER.parent), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(store.port),
                               ",".join(BACKENDS)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=150)
            assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world", [2, 3, 4])
def test_siglip_distributed_matches_single_process_and_open_clip(world):
    results = _run_group(world)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures[:10])
    assert all(r["checked"] > 50 for r in results), [r["checked"] for r in results]
    # Memory: the ring's autograd node saves this rank's inputs and the two scalars,
    # whatever the world size; open_clip's graph keeps every received block and its logits.
    n, d, fp32 = 5, 7, 4
    for r in results:
        for case, saved in r["saved_bytes"].items():
            assert saved["mmkernels"] <= 2 * n * d * fp32 + 2 * fp32, (case, saved)
            assert saved["open_clip"] > world * saved["mmkernels"], (case, saved)
