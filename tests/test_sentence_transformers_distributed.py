"""The sentence-transformers drop-ins with gather_across_devices=True over 2 gloo
processes (tests/sentence_transformers_distributed_worker.py, started once by
tests/test_distributed.py's spawner; each test asserts one case on every rank):
MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss on a tiny
randomly initialised BERT against sentence-transformers' own losses with
gather_across_devices=True in the same processes (each rank's value and every
parameter's gradient; 0 and 1 hard negatives; three direction settings; dot_score;
no grad), against the single process (the ranks' mean value and mean gradients),
and uneven local batches against the fp64 single-process per-query losses."""

from pathlib import Path

import pytest
import torch.distributed as dist

import sentence_transformers_distributed_worker as worker
import test_distributed

pytest.importorskip("sentence_transformers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available(),
                                reason="torch.distributed is not available")

WORLD = 2
run_world = test_distributed.cached_worlds(Path(worker.__file__))


@pytest.mark.timeout(test_distributed.WORLD_TIMEOUT + 60)
@pytest.mark.parametrize("case", worker.cases(test_distributed.TILED))
def test_sentence_transformers_distributed(case):
    test_distributed.assert_case_passed(run_world(WORLD), case)
