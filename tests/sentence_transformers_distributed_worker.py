"""One rank of the sentence-transformers drop-ins' gather_across_devices=True tests
(tests/test_sentence_transformers_distributed.py starts W of them with
tests/test_distributed.py's spawner).

    python tests/sentence_transformers_distributed_worker.py WORLD RANK STORE_PORT OUT_DIR BACKENDS

Joins a gloo process group, builds the tiny randomly initialised BERT of
tests/embedding_cases.py (seeded: the same weights on every rank), takes its
rank's rows of tests/embedding_cases.TEXTS, runs every case of :func:`cases` in
order (they are collective) and writes ``OUT_DIR/rank<RANK>.json``: case name ->
null when it passed on this rank, else the failure. Cases:

- ``theirs-{plain,cached}-CONFIG-kK``: the drop-in against sentence-transformers'
  own loss of the same class with ``gather_across_devices=True`` in the same
  processes: this rank's loss value and every parameter's gradient on this rank
  (before any DDP averaging), K hard negatives; the cached losses with
  mini-batches of 2 (a local batch of 3: one short mini-batch).
- ``theirs-plain-all-k1-dot``: util.dot_score at scale 1.
- ``theirs-cached-all-k1-nograd``: evaluation (no grad): the value.
- ``single-{plain,cached}-all-k1``: against the single process: the mean of the
  ranks' values is theirs without gathering on the global batch, and so is the
  mean of the ranks' parameter gradients (DDP's averaging).
- ``uneven-BACKEND``: local batches of different sizes (theirs needs them equal), on
  embeddings: each rank's value is the mean of its own queries' losses in the
  fp64 single-process per-query losses of the global batch, and its embedding
  gradients are those of the sum of every rank's value.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_worker import (  # noqa: E402
    join_world, leaf, run_and_report, run_by_prefix, shard)
from embedding_cases import ALL, TEXTS, assert_same, run_loss, save_tiny_bert  # noqa: E402

CONFIGS = {  # name -> (directions, partition_mode)
    "q2d": (("query_to_doc",), "joint"),
    "all": (ALL, "joint"),
    "q2d+d2q-per": (("query_to_doc", "doc_to_query"), "per_direction"),
}
MINI_BATCH = 2


def cases(backend_names: list[str]) -> list[str]:
    """The case names, in the order every rank runs them."""
    names = [f"theirs-{kind}-{config}-k{k}" for kind in ("plain", "cached") for config in CONFIGS
             for k in (0, 1)]
    names += ["theirs-plain-all-k1-dot", "theirs-cached-all-k1-nograd", "single-plain-all-k1",
              "single-cached-all-k1"]
    names += [f"uneven-{backend}" for backend in backend_names]
    return names


def losses_of(kind: str, model, gather: bool, **settings):
    """(ours, theirs): the drop-in and sentence-transformers' loss of the class ``kind``."""
    from sentence_transformers.sentence_transformer import losses

    from mmkernels.integrations import sentence_transformers as ours

    name = "MultipleNegativesRankingLoss"
    if kind == "cached":
        name, settings = "Cached" + name, dict(settings, mini_batch_size=MINI_BATCH)
    return tuple(getattr(module, name)(model, gather_across_devices=gather, **settings)
                 for module in (ours, losses))


def features(model, rows, columns):
    """The model's inputs of ``rows`` of the first ``columns`` text columns."""
    return [model.preprocess([column[i] for i in rows]) for column in TEXTS[:columns]]


def theirs_case(name, world, rank, model):
    """The drop-in and theirs, both gathering: this rank's value and gradients."""
    from sentence_transformers import util

    parts = name.split("-")  # theirs-KIND-CONFIG-kK[-dot|-nograd]; a CONFIG may hold "-"
    setting = parts[-1] if parts[-1] in ("dot", "nograd") else None
    if setting:
        parts = parts[:-1]
    kind, config, k = parts[1], "-".join(parts[2:-1]), int(parts[-1][1:])
    directions, mode = CONFIGS[config]
    settings = dict(directions=directions, partition_mode=mode)
    if setting == "dot":
        settings.update(similarity_fct=util.dot_score, scale=1.0)
    ours, theirs = losses_of(kind, model, True, **settings)
    inputs = features(model, own_rows(world, rank), 2 + k)
    if setting == "nograd":
        model.eval()
        with torch.no_grad():
            got, expected = ours(inputs, None), theirs(inputs, None)
        assert not got.requires_grad
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
        return
    assert_same(run_loss(model, ours, inputs), run_loss(model, theirs, inputs))


def single_case(name, world, rank, model):
    """The ranks' mean value and mean gradients: the global batch's on one process."""
    kind = name.split("-")[1]
    ours, _ = losses_of(kind, model, True, directions=ALL)
    value, grads = run_loss(model, ours, features(model, own_rows(world, rank), 3))
    value = value.clone()
    dist.all_reduce(value)
    for g in grads.values():
        dist.all_reduce(g)
    mean = (value / world, {pname: g / world for pname, g in grads.items()})
    _, single = losses_of("plain", model, False, directions=ALL)  # theirs, not gathering
    assert_same(mean, run_loss(model, single, features(model, range(len(TEXTS[0])), 3)))


def uneven_case(name, world, rank, model):
    """Local batches of different sizes, on embeddings (``model``, whose texts split
    evenly, is unused)."""
    import mmkernels
    from mmkernels.integrations.sentence_transformers import MultipleNegativesRankingLoss

    backend = name.split("-", 1)[1]
    sizes = {2: [4, 1], 3: [2, 4, 1]}[world]
    n, k, d = sum(sizes), 1, 8
    gen = torch.Generator().manual_seed(3)
    columns = [torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(k + 2)]
    columns[1] = columns[1] + 0.5 * columns[0]
    settings = dict(directions=ALL, false_negative_margin=1.0)
    loss = MultipleNegativesRankingLoss(None, gather_across_devices=True, backend=backend,
                                        **settings)
    mine = [leaf(shard(c, sizes, rank), torch.float32) for c in columns]
    value = loss.compute_loss_from_embeddings(mine, None)
    grads = torch.autograd.grad(value, mine)

    whole = [leaf(c) for c in columns]
    per_query = mmkernels.multiple_negatives_loss(whole[0], torch.cat(whole[1:]), reduction="none",
                                                  backend="naive", **settings)
    weights = torch.cat([torch.full((m,), 1.0 / m, dtype=torch.float64) for m in sizes])
    expected_grads = torch.autograd.grad((weights * per_query).sum(), whole)
    expected = shard(per_query.detach().unsqueeze(1), sizes, rank).mean()
    torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=1e-6)
    for column, (g, e) in enumerate(zip(grads, expected_grads)):
        torch.testing.assert_close(g.double(), shard(e, sizes, rank), rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"grad of column {column}: {m}")


def own_rows(world: int, rank: int) -> range:
    """This rank's rows of the texts: equal shards in rank order."""
    per_rank = len(TEXTS[0]) // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def tiny_model(out_dir: str, rank: int):
    """The tiny BERT (seeded weights), saved by rank 0 (transformers' save_pretrained
    writes on the main process only), loaded by every rank, checked equal."""
    from sentence_transformers import SentenceTransformer

    path = Path(out_dir, "tiny_bert")
    if rank == 0:
        path.mkdir()
        save_tiny_bert(path)
    dist.barrier()
    model = SentenceTransformer(str(path), device="cpu")
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    first = flat.clone()
    dist.broadcast(first, 0)
    assert torch.equal(flat, first), "the tiny BERT differs between ranks"
    return model


CASES = (("theirs-", theirs_case), ("single-", single_case), ("uneven-", uneven_case))


def main():
    world, rank, out_dir, backend_names = join_world()
    assert len(TEXTS[0]) % world == 0, f"{len(TEXTS[0])} texts do not split over {world} ranks"
    model = tiny_model(out_dir, rank)
    run_and_report(cases(backend_names),
                   lambda name: run_by_prefix(name, CASES, world, rank, model), rank, out_dir)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
