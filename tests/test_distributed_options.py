"""mmkernels.distributed.contrastive_loss with its options (false_negative_margin, groups
in both group modes, debias_tau_plus) over 2 and 3 gloo processes.

Each world size starts its W processes once (tests/contrastive_options_worker.py,
spawned by tests/test_distributed.py's helper); they run every case and report
per case, and each test below asserts one case on every rank: the loss and the
gradients (image and text features, logit_scale) equal the single-process
``mmkernels.contrastive_loss`` with the same options on the concatenated batch
(fp64, materialized S), for each option and combinations of them (groups with a
margin or label smoothing), both strategies, even and uneven shards (a 1-pair
shard), normalized and dot-product features, fp32 and fp64, frozen towers (also
frozen on some ranks only), no_grad, three losses in one graph, DDP's averaged
parameter gradients; the errors raised on every rank; and the ring's per-rank
peak memory with each option.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import contrastive_options_worker as worker
import test_distributed

WORLDS = (2, 3)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


run_world = test_distributed.cached_worlds(Path(worker.__file__))


def params():
    return [pytest.param(world, name, id=f"W{world}-{name}")
            for world in WORLDS for name in worker.cases(world, test_distributed.TILED)]


@pytest.mark.timeout(test_distributed.WORLD_TIMEOUT + 60)
@pytest.mark.parametrize("world,case", params())
def test_distributed_options(world, case):
    reports = run_world(world)
    test_distributed.assert_case_passed(reports, case)
    if case.startswith("memory-"):  # the figures, for `pytest -rP`
        for rank, report in reports.items():
            print(f"rank {rank}: peak RSS added by fwd+bwd (MiB): {report['_memory_mib']}")


# --- single-process behaviour ------------------------------------------------------

def test_world_of_one_is_the_single_process_loss(tmp_path):
    """A group of one process: the plain loss with each option, and its gradients."""
    import mmkernels
    from mmkernels import distributed

    with test_distributed.world_of_one(tmp_path):
        a, b, ids = worker.global_batch([7])
        s = torch.tensor(10.0, requires_grad=True)
        for options in (dict(groups=ids, group_mode="exclude", false_negative_margin=0.0),
                        dict(groups=ids, label_smoothing=0.1), dict(debias_tau_plus=0.2)):
            for strategy in ("ring", "gather"):
                got = distributed.contrastive_loss(a, b, s, strategy=strategy, normalize=True,
                                                   **options)
                want = mmkernels.contrastive_loss(a, b, s, normalize=True, **options)
                torch.testing.assert_close(got, want)
                torch.testing.assert_close(torch.autograd.grad(got, s),
                                           torch.autograd.grad(want, s))
        with pytest.raises(ValueError, match="debias_tau_plus: needs N >= 2"):
            distributed.contrastive_loss(a[:1], b[:1], debias_tau_plus=0.1)
