"""One rank of the distributed multiple_negatives_loss tests (tests/test_embedding_distributed.py
starts W of them with tests/test_distributed.py's spawner).

    python tests/embedding_distributed_worker.py WORLD RANK STORE_PORT OUT_DIR BACKEND[,BACKEND...]

Joins a gloo process group through the parent's TCPStore, runs every case of
:func:`cases` in order (the same order on every rank: the cases are
collective) and writes ``OUT_DIR/rank<RANK>.json``: case name -> null when it
passed on this rank, else the failure. The global batch is drawn from a seed
shared by every rank, in sentence-transformers' gather_across_devices order
(queries in rank order; each document block in rank order); each rank checks
its loss and gradients against the single-process loss on that batch in fp64
(``mmkernels.multiple_negatives_loss``, feature gradients times W), and
against sentence-transformers' MultipleNegativesRankingLoss(gather_across_devices=True)
run in the same processes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_worker import expect_error, join_world, leaf, run_and_report, shard  # noqa: E402
from tolerances import assert_matches  # noqa: E402

D = 12
TILES = (4, 8)  # torch backend tiles: even these small blocks straddle tile edges
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
CONFIGS = {  # name -> (directions, partition_mode)
    "q2d": (("query_to_doc",), "joint"),
    "q2d+d2q": (("query_to_doc", "doc_to_query"), "joint"),
    "q2d+q2q": (("query_to_doc", "query_to_query"), "joint"),
    "q2d+d2d": (("query_to_doc", "doc_to_doc"), "joint"),
    "all": (ALL, "joint"),
    "q2d-per": (("query_to_doc",), "per_direction"),
    "q2d+d2q-per": (("query_to_doc", "doc_to_query"), "per_direction"),
}


def layouts(world: int) -> dict:
    """Local batch sizes per rank: even, and uneven ones with a 1-query rank."""
    return {"even": [3] * world, "uneven": {2: [4, 1], 3: [2, 4, 1]}[world]}


def cases(world: int, backend_names: list[str]) -> list[str]:
    """The case names, in the order every rank runs them."""
    names = []
    for backend in backend_names:
        for config in CONFIGS:
            for k in (0, 1):
                names.append(f"loss-{backend}-{config}-k{k}-even-plain")
        for config in ("q2d", "all", "q2d+d2q-per"):
            for margin in ("0", "1"):
                names.append(f"loss-{backend}-{config}-k1-uneven-margin{margin}")
        names += [f"loss-{backend}-all-k1-uneven-plain", f"loss-{backend}-q2d+d2q-per-k0-uneven-plain",
                  f"loss-{backend}-all-k1-even-dot", f"loss-{backend}-all-k1-uneven-fp64",
                  f"loss-{backend}-all-k1-even-bf16", f"loss-{backend}-all-k2-uneven-list",
                  f"loss-{backend}-all-k1-uneven-sum", f"loss-{backend}-all-k1-even-number",
                  f"loss-{backend}-all-k1-uneven-frozen_docs",
                  f"loss-{backend}-all-k1-uneven-frozen_query"]
    names.append("loss-naive-all-k1-uneven-margin0")
    names += [f"st-{config}-k{k}" for config in CONFIGS for k in (0, 1)]
    names += ["st-all-k1-dot", "ddp-all", "twice-same-graph"]
    names += ["error-mismatched-k", "error-mismatched-directions", "error-invalid-on-one-rank",
              "error-reduction-none", "error-mismatched-requires-grad", "after-errors"]
    if world == 2:
        names.append("memory-ring")
    return names


# --- the global batch and the single-process reference -----------------------------------

def global_batch(sizes, k, dtype=torch.float32, seed=0):
    """Global queries (N, D) and the k+1 global document blocks (N, D) each."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    q = torch.randn(n, D, generator=gen, dtype=torch.float64)
    blocks = [torch.randn(n, D, generator=gen, dtype=torch.float64) for _ in range(k + 1)]
    blocks[0] = blocks[0] + 0.5 * q  # positives somewhat closer than chance
    return q.to(dtype), [b.to(dtype) for b in blocks]


def local_docs(blocks, sizes, rank):
    """This rank's documents in the single-process layout: its rows of each block."""
    return torch.cat([shard(b, sizes, rank) for b in blocks])


def reference(q, blocks, scale, sizes, rank, dtype=torch.float64, backend="naive", **settings):
    """(loss, W * grad of the local queries, W * grad of the local documents, grad of
    the scale) of the single-process loss on the global batch (in ``dtype``, on
    ``backend``: by default the naive one, sentence-transformers' algorithm)."""
    world = len(sizes)
    gq, gb = leaf(q, dtype), [leaf(b, dtype) for b in blocks]
    s = leaf(torch.as_tensor(float(scale), dtype=torch.float64), dtype)
    import mmkernels
    loss = mmkernels.multiple_negatives_loss(gq, torch.cat(gb), logit_scale=s, backend=backend,
                                             **settings)
    grads = torch.autograd.grad(loss, [gq, *gb, s])
    return (loss.detach(), world * shard(grads[0], sizes, rank),
            world * local_docs(grads[1:-1], sizes, rank), grads[-1])


def check(got, want, dtype, what, same=None):
    names = ("loss", "query grad", "docs grad", "logit_scale grad")
    same = same or (None,) * 4
    for name, g, w, s in zip(names, got, want, same):
        if w is None:
            assert g is None, f"{what} {name}: expected no gradient"
            continue
        assert g is not None, f"{what} {name}: no gradient"
        assert_matches(g, w, dtype, f"{what} {name}", s)


# --- the cases -------------------------------------------------------------------

def loss_case(name, world, rank, mmdist):
    parts = name.split("-")  # loss-BACKEND-CONFIG-kK-LAYOUT-SETTING; a CONFIG may hold "-"
    backend, config, (k, layout, setting) = parts[1], "-".join(parts[2:-3]), parts[-3:]
    directions, mode = CONFIGS[config]
    k = int(k[1:])
    sizes = layouts(world)[layout]
    dtype = {"fp64": torch.float64, "bf16": torch.bfloat16}.get(setting, torch.float32)
    normalize = setting != "dot"
    scale = 0.5 if setting == "dot" else 20.0
    margin = float(setting[len("margin"):]) if setting.startswith("margin") else None
    reduction = "sum" if setting == "sum" else "mean"
    settings = dict(directions=directions, partition_mode=mode, false_negative_margin=margin,
                    normalize=normalize, reduction=reduction)
    q, blocks = global_batch(sizes, k, dtype)
    lq, ld = shard(q, sizes, rank), local_docs(blocks, sizes, rank)
    query_trains, docs_trains = setting != "frozen_query", setting != "frozen_docs"
    x = lq.clone().requires_grad_(query_trains)
    y = [shard(b, sizes, rank).clone().requires_grad_() for b in blocks] if setting == "list" \
        else ld.clone().requires_grad_(docs_trains)
    s = scale if setting == "number" else torch.tensor(
        scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    loss = mmdist.multiple_negatives_loss(x, y, logit_scale=s, backend=backend, **settings)
    loss.backward()
    docs_grad = torch.cat([b.grad for b in y]) if setting == "list" else y.grad
    got = (loss.detach(), x.grad, docs_grad, s.grad if isinstance(s, torch.Tensor) else None)
    want = list(reference(q, blocks, scale, sizes, rank, **settings))
    if not query_trains:
        want[1] = None
    if not docs_trains:
        want[2] = None
    if setting == "number":
        want[3] = None
    same = None
    if dtype == torch.bfloat16:
        # The bar: the single-process loss's own bf16 error on the same backend (its
        # gradients sum several bf16 parts, as ours do; the naive backend's are fewer).
        same = reference(q, blocks, scale, sizes, rank, dtype=torch.bfloat16, backend=backend,
                         **settings)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if got[1] is not None:
        assert got[1].dtype == dtype, f"query gradient dtype {got[1].dtype}"
    check(got, want, dtype, name, same)


def sentence_transformers_case(name, world, rank, mmdist):
    """Theirs with gather_across_devices=True on the same local embeddings: their value on
    each rank is its own queries' mean, whose mean over ranks is our global loss; the
    embedding gradients (their all-gather's backward sums every rank's loss) are ours."""
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer import losses

    parts = name.split("-")
    dot = parts[-1] == "dot"
    config, k = "-".join(parts[1:-2 if dot else -1]), int(parts[-2 if dot else -1][1:])
    directions, mode = CONFIGS[config]
    sizes = layouts(world)["even"]  # their all_gather needs equal local batches
    q, blocks = global_batch(sizes, k)
    scale = 0.5 if dot else 20.0
    columns = [leaf(shard(x, sizes, rank)) for x in (q, *blocks)]
    theirs = losses.MultipleNegativesRankingLoss(
        None, scale=scale, similarity_fct=util.dot_score if dot else util.cos_sim,
        directions=directions, partition_mode=mode, gather_across_devices=True)
    their_loss = theirs.compute_loss_from_embeddings(columns, None)
    their_grads = torch.autograd.grad(their_loss, columns)
    their_mean = their_loss.detach().clone()
    dist.all_reduce(their_mean)
    their_mean /= world

    mine = [leaf(c) for c in columns]
    loss = mmdist.multiple_negatives_loss(mine[0], mine[1:], logit_scale=scale,
                                          directions=directions, partition_mode=mode,
                                          normalize=not dot)
    grads = torch.autograd.grad(loss, mine)
    torch.testing.assert_close(loss, their_mean, rtol=2e-5, atol=1e-6, msg=f"{name}: loss")
    for column, (g, t) in enumerate(zip(grads, their_grads)):
        torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-6, msg=f"{name}: grad of column {column}")


class Towers(torch.nn.Module):
    """A query tower and a document tower (hard negatives share it), and a log scale."""

    def __init__(self):
        super().__init__()
        self.query = torch.nn.Linear(7, D)
        self.docs = torch.nn.Linear(7, D)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.5))

    def forward(self, x, y):
        return self.query(x), self.docs(y), self.log_scale.exp()


def ddp_case(name, world, rank, mmdist):
    """DDP's averaged parameter gradients equal the single-process global-batch ones."""
    import mmkernels

    sizes, k = layouts(world)["uneven"], 1
    gen = torch.Generator().manual_seed(1)
    n = sum(sizes)
    x = torch.randn(n, 7, generator=gen)
    y = [torch.randn(n, 7, generator=gen) for _ in range(k + 1)]
    torch.manual_seed(2)
    model = Towers()
    single = Towers().double()
    single.load_state_dict(model.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    fq, fd, s = ddp(shard(x, sizes, rank), local_docs(y, sizes, rank))
    loss = mmdist.multiple_negatives_loss(fq, fd, logit_scale=s, directions=ALL,
                                          false_negative_margin=1.0)
    loss.backward()
    fq, fd, s = single(x.double(), torch.cat(y).double())
    want = mmkernels.multiple_negatives_loss(fq, fd, logit_scale=s, directions=ALL,
                                             false_negative_margin=1.0, backend="naive")
    want.backward()
    assert_matches(loss.detach(), want.detach(), torch.float32, f"{name} loss")
    for (pname, p), q in zip(model.named_parameters(), single.parameters()):
        assert_matches(p.grad, q.grad, torch.float32, f"{name} grad of {pname}")


def twice_case(name, world, rank, mmdist):
    """Two ring losses in one graph, one backward: their collectives keep one order."""
    sizes, k = layouts(world)["uneven"], 1
    q, blocks = global_batch(sizes, k)
    x, y = leaf(shard(q, sizes, rank)), leaf(local_docs(blocks, sizes, rank))
    s = leaf(torch.tensor(20.0))
    first = dict(directions=ALL)
    second = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                  false_negative_margin=0.0)
    loss = (mmdist.multiple_negatives_loss(x, y, logit_scale=s, **first)
            + mmdist.multiple_negatives_loss(x, y, logit_scale=s, **second))
    loss.backward()
    r1 = reference(q, blocks, 20.0, sizes, rank, **first)
    r2 = reference(q, blocks, 20.0, sizes, rank, **second)
    check((loss.detach(), x.grad, y.grad, s.grad), tuple(a + b for a, b in zip(r1, r2)),
          torch.float32, name)


def error_case(name, world, rank, mmdist):
    sizes = layouts(world)["uneven"]
    what = name.split("-", 1)[1]
    k = 1 if what != "mismatched-k" else rank % 2
    q, blocks = global_batch(sizes, k)
    lq, ld = shard(q, sizes, rank), local_docs(blocks, sizes, rank)
    loss = mmdist.multiple_negatives_loss
    if what == "mismatched-k":
        expect_error(lambda: loss(lq, ld), ValueError, "docs", "k differs", "rank 0: 0",
                     "rank 1: 1")
    elif what == "mismatched-directions":
        directions = ALL if rank == 0 else ("query_to_doc",)
        expect_error(lambda: loss(lq, ld, directions=directions), ValueError, "directions",
                     "differs across ranks")
    elif what == "invalid-on-one-rank":
        docs = ld[:, :-1] if rank == 1 else ld  # rank 1's documents lack a feature
        if rank == 1:
            expect_error(lambda: loss(lq, docs), ValueError, "docs", "feature dimensions differ")
        else:
            expect_error(lambda: loss(lq, docs), ValueError, "rank(s) [1]")
    elif what == "reduction-none":
        expect_error(lambda: loss(lq, ld, reduction="none"), ValueError, "reduction", "'none'")
    elif what == "mismatched-requires-grad":
        x = lq.clone().requires_grad_(rank == 0)
        expect_error(lambda: loss(x, ld), ValueError, "query", "requires grad on some ranks")
    else:
        raise AssertionError(f"unknown error case {name}")


def after_errors_case(name, world, rank, mmdist):
    sizes, k = layouts(world)["uneven"], 1
    q, blocks = global_batch(sizes, k)
    x, y = leaf(shard(q, sizes, rank)), leaf(local_docs(blocks, sizes, rank))
    loss = mmdist.multiple_negatives_loss(x, y, directions=ALL)
    loss.backward()
    want = reference(q, blocks, 20.0, sizes, rank, directions=ALL)
    check((loss.detach(), x.grad, y.grad), want[:3], torch.float32, name)


def memory_case(name, world, rank, mmdist):
    """Peak RSS of a ring fwd+bwd (all four directions, k = 1) stays O(local_N * D): far
    below the local rows' logits against the global batch, which sentence-transformers
    materializes (and which the same probe must see it hold)."""
    from memory_probe import reset_peak, rss_mib
    from sentence_transformers.sentence_transformer import losses

    from mmkernels.ops import _common

    _common.TILE_SHAPE = DEFAULT_TILES  # the library's tiles: the test tiles would take minutes
    n, d, k = 2048, 32, 1  # one of their score matrices: 64 MiB per rank at W = 2
    gen = torch.Generator().manual_seed(rank)
    columns = [torch.randn(n, d, generator=gen).requires_grad_() for _ in range(k + 2)]
    theirs = losses.MultipleNegativesRankingLoss(None, directions=ALL, gather_across_devices=True)
    peaks = {}
    for who in ("ring", "sentence_transformers"):
        for c in columns:
            c.grad = None
        base = rss_mib("VmRSS")
        reset_peak()
        if who == "ring":
            mmdist.multiple_negatives_loss(columns[0], columns[1:], directions=ALL).backward()
        else:
            theirs.compute_loss_from_embeddings(columns, None).backward()
        peaks[who] = rss_mib("VmHWM") - base
    # One of their (n, N * (1+k)) fp32 score matrices, N = world * n.
    one_matrix = n * world * n * (1 + k) * 4 / 2**20
    print(f"rank {rank} memory peaks (MiB): {peaks}; one local score matrix {one_matrix:.0f} MiB",
          flush=True)
    assert peaks["sentence_transformers"] > one_matrix, f"the probe missed their scores: {peaks}"
    assert peaks["ring"] < 48, f"ring fwd+bwd added {peaks['ring']:.0f} MiB"
    MEMORY.update(peaks)


MEMORY: dict = {}
DEFAULT_TILES = None  # the library's tile shapes, restored for the memory case


def run_case(name, world, rank, mmdist):
    if name.startswith("loss-"):
        return loss_case(name, world, rank, mmdist)
    if name.startswith("st-"):
        return sentence_transformers_case(name, world, rank, mmdist)
    if name.startswith("ddp-"):
        return ddp_case(name, world, rank, mmdist)
    if name == "twice-same-graph":
        return twice_case(name, world, rank, mmdist)
    if name.startswith("error-"):
        return error_case(name, world, rank, mmdist)
    if name == "after-errors":
        return after_errors_case(name, world, rank, mmdist)
    if name.startswith("memory-"):
        return memory_case(name, world, rank, mmdist)
    raise AssertionError(f"unknown case {name}")


def main():
    world, rank, out_dir, backend_names = join_world()
    from mmkernels import distributed as mmdist
    from mmkernels.ops import _common

    global DEFAULT_TILES
    DEFAULT_TILES = _common.TILE_SHAPE
    _common.TILE_SHAPE = {"cpu": TILES, "cuda": TILES}
    run_and_report(cases(world, backend_names), lambda name: run_case(name, world, rank, mmdist),
                   rank, out_dir, _memory_mib=MEMORY)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
