"""mmkernels.distributed and the distributed ClipLoss, over 2, 3 and 4 gloo processes.

Each world size starts its W processes once (tests/distributed_worker.py), on
127.0.0.1 through a TCPStore that this process serves on a free port; they
run every case and report per case, and each test below asserts one case on
every rank: the loss and every gradient equal the single-process fp64 result
on the concatenated batch (ring and gather, even and uneven shards, label
smoothing, normalize, fp64/bf16/fp16, logit_scale 100 unnormalized,
non-contiguous inputs), open_clip's ClipLoss in the same processes for each
flag combination, DDP's averaged gradients, the errors raised on every rank,
and the ring's per-rank memory. Everything is bounded: the processes' own
collectives time out after 60 s and the group is killed after WORLD_TIMEOUT.
"""

import contextlib
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_worker
from conftest import backends_under_test

WORKER = Path(distributed_worker.__file__)
ROOT = WORKER.parent.parent
WORLDS = (2, 3, 4)
WORLD_TIMEOUT = 150  # seconds for one world's processes to start, run every case and exit

# The tiled backends that run on CPU tensors in this process (naive gets its own case).
TILED = [name for name in backends_under_test() if name in ("torch", "cpu")]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def cached_worlds(worker: Path):
    """``run_world(world)`` for the worker script ``worker``: rank -> report (case ->
    failure or None) of its group of ``world`` processes, run once; a group that
    failed as a whole fails every test of that world with the same message, without
    running again."""
    @functools.lru_cache(maxsize=None)
    def run_world(world: int) -> dict:
        try:
            return _run_world(world, worker)
        except AssertionError as failure:
            return {"failed": str(failure)}
    return run_world


def assert_case_passed(reports: dict, case: str) -> None:
    """The case passed on every rank of a world's reports."""
    assert "failed" not in reports, reports.get("failed")
    failures = {rank: report[case] for rank, report in reports.items() if report.get(case)}
    assert not failures, "\n".join(f"rank {rank}:\n{text}" for rank, text in failures.items())


def _run_world(world: int, worker: Path = WORKER) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on the loopback interface
    # This process serves the rendezvous on a port the OS picks: no port can clash.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=WORLD_TIMEOUT))
    with tempfile.TemporaryDirectory() as out:
        procs = [subprocess.Popen([sys.executable, str(worker), str(world), str(rank),
                                   str(store.port), out, ",".join(TILED)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world)]
        deadline = time.monotonic() + WORLD_TIMEOUT
        outputs, timed_out = [], False
        try:
            for proc in procs:
                try:
                    left = 0.1 if timed_out else max(0.1, deadline - time.monotonic())
                    outputs.append(proc.communicate(timeout=left)[0])
                except subprocess.TimeoutExpired:
                    timed_out = True
                    proc.kill()
                    outputs.append(proc.communicate()[0])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        reports = {}
        for rank in range(world):
            path = Path(out, f"rank{rank}.json")
            if path.exists():
                reports[rank] = json.loads(path.read_text())
    del store
    if timed_out or len(reports) != world:
        tails = "\n".join(f"--- rank {r} ---\n{o[-3000:]}" for r, o in enumerate(outputs))
        why = f"timed out after {WORLD_TIMEOUT} s" if timed_out else "a rank wrote no report"
        raise AssertionError(f"world of {world}: {why}\n{tails}")
    return reports


run_world = cached_worlds(WORKER)


def params():
    out = []
    for world in WORLDS:
        for name in distributed_worker.cases(world, TILED):
            out.append(pytest.param(world, name, id=f"W{world}-{name}"))
    return out


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
@pytest.mark.parametrize("world,case", params())
def test_distributed(world, case):
    assert_case_passed(run_world(world), case)


def test_open_clip_was_compared_when_installed():
    """The ClipLoss cases compare against open_clip whenever it is importable here."""
    pytest.importorskip("open_clip")
    reports = run_world(2)
    assert "failed" not in reports, reports.get("failed")
    assert all(report["_open_clip"] for report in reports.values())


# --- single-process behaviour ------------------------------------------------------

def test_needs_an_initialized_process_group():
    from mmkernels import distributed

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.contrastive_loss(torch.randn(3, 4), torch.randn(3, 4))


def test_distributed_cliploss_needs_an_initialized_process_group():
    import mmkernels

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        mmkernels.ClipLoss(rank=1, world_size=2)(torch.randn(3, 4), torch.randn(3, 4), 2.0)


@contextlib.contextmanager
def world_of_one(tmp_path):
    """This process as a gloo group of one, for the body of the with-statement."""
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_of_one_is_the_single_process_loss(tmp_path):
    """A group of one process: the plain loss, and its gradients, unchanged."""
    import mmkernels
    from mmkernels import distributed

    with world_of_one(tmp_path):
        a, b = torch.randn(6, 5), torch.randn(6, 5)
        s = torch.tensor(3.0, requires_grad=True)
        for strategy in ("ring", "gather"):
            got = distributed.contrastive_loss(a, b, s, strategy=strategy, normalize=True)
            want = mmkernels.contrastive_loss(a, b, s, normalize=True)
            torch.testing.assert_close(got, want)
            (g,) = torch.autograd.grad(got, s)
            (w,) = torch.autograd.grad(want, s)
            torch.testing.assert_close(g, w)
        with pytest.raises(ValueError, match="strategy"):
            distributed.contrastive_loss(a, b, strategy="allreduce")
