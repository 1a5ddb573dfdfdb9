"""mmkernels.distributed.multiple_negatives_loss over 2 and 3 gloo processes.

Each world size starts its W processes once (tests/embedding_distributed_worker.py,
spawned by tests/test_distributed.py's helper); they run every case and report
per case, and each test below asserts one case on every rank: the loss and the
gradients (queries, documents, logit_scale) equal the single-process loss on the
global batch in fp64 (every direction and partition mode, k = 0, 1, 2, margins,
even and uneven local batches, cos and dot, fp64/bf16, the list layout, sum,
frozen sides, two losses in one graph, DDP's averaged parameter gradients),
sentence-transformers' MultipleNegativesRankingLoss(gather_across_devices=True)
in the same processes, the errors raised on every rank, and the ring's per-rank
peak memory against theirs.
"""

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import embedding_distributed_worker as worker
import test_distributed

WORLDS = (2, 3)
HAS_ST = importlib.util.find_spec("sentence_transformers") is not None

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@functools.lru_cache(maxsize=None)
def run_world(world: int) -> dict:
    """Rank -> report of the worker group of ``world`` processes, run once."""
    try:
        return test_distributed._run_world(world, Path(worker.__file__))
    except AssertionError as failure:
        return {"failed": str(failure)}


def params():
    out = []
    for world in WORLDS:
        for name in worker.cases(world, test_distributed.TILED):
            needs_st = name.startswith(("st-", "memory-"))
            marks = [pytest.mark.skipif(not HAS_ST, reason="sentence-transformers not installed")
                     ] if needs_st else []
            out.append(pytest.param(world, name, id=f"W{world}-{name}", marks=marks))
    return out


@pytest.mark.timeout(test_distributed.WORLD_TIMEOUT + 60)
@pytest.mark.parametrize("world,case", params())
def test_embedding_distributed(world, case):
    reports = run_world(world)
    assert "failed" not in reports, reports.get("failed")
    failures = {rank: report[case] for rank, report in reports.items() if report.get(case)}
    assert not failures, "\n".join(f"rank {rank}:\n{text}" for rank, text in failures.items())
    if case.startswith("memory-"):  # the figures, for `pytest -rP`
        for rank, report in reports.items():
            print(f"rank {rank}: peak RSS added by fwd+bwd (MiB): {report['_memory_mib']}")


# --- single-process behaviour ------------------------------------------------------

def test_needs_an_initialized_process_group():
    from mmkernels import distributed

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.multiple_negatives_loss(torch.randn(3, 4), torch.randn(6, 4))


def test_world_of_one_is_the_single_process_loss(tmp_path):
    """A group of one process: the plain loss, and its gradients, unchanged."""
    import mmkernels
    from mmkernels import distributed

    with test_distributed.world_of_one(tmp_path):
        q, docs = torch.randn(5, 6), torch.randn(10, 6)
        s = torch.tensor(20.0, requires_grad=True)
        kw = dict(directions=worker.ALL, false_negative_margin=0.5)
        got = distributed.multiple_negatives_loss(q, docs, logit_scale=s, **kw)
        want = mmkernels.multiple_negatives_loss(q, docs, logit_scale=s, **kw)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, s), torch.autograd.grad(want, s))
        with pytest.raises(ValueError, match="reduction"):
            distributed.multiple_negatives_loss(q, docs, reduction="none")
        with pytest.raises(ValueError, match="directions"):
            distributed.multiple_negatives_loss(q, docs, directions=("doc_to_query",))
