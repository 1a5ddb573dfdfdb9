"""One rank of the tests of mmkernels.distributed.contrastive_loss's options
(tests/test_distributed_options.py starts W of them with tests/test_distributed.py's spawner).

    python tests/contrastive_options_worker.py WORLD RANK STORE_PORT OUT_DIR BACKEND[,BACKEND...]

Joins a gloo process group through the parent's TCPStore, runs every case of
:func:`cases` in order (the same order on every rank: the cases are collective)
and writes ``OUT_DIR/rank<RANK>.json``: case name -> null when it passed on this
rank, else the failure. The global batch (pairs clustered by group, groups that
span ranks, a false negative across ranks) is drawn from a seed shared by every
rank; each rank checks its loss and gradients (features and logit_scale) against
the single-process ``mmkernels.contrastive_loss`` with the same options on the
concatenated batch, in fp64 on the naive backend (the materialized S), feature
gradients times W.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_worker import (ddp_matches_single_process, expect_error, join_world,  # noqa: E402
                                leaf, run_and_report, run_by_prefix, shard, use_test_tiles)
from tolerances import assert_matches  # noqa: E402

D = 12
TILES = (4, 8)  # torch backend tiles: even these small shards straddle tile edges
DEFAULT_TILES = None  # the library's tile shapes, restored for the memory case

# name -> (options, normalize, logit_scale)
SETTINGS = {
    "smoothing": (dict(label_smoothing=0.1), True, 10.0),  # no option: the baseline
    "margin": (dict(false_negative_margin=0.5), True, 10.0),
    "margin_dot": (dict(false_negative_margin=-0.2), False, 0.5),
    "positives": (dict(groups=True), True, 10.0),
    "positives_smoothing": (dict(groups=True, label_smoothing=0.1), True, 10.0),
    "exclude": (dict(groups=True, group_mode="exclude"), True, 10.0),
    "exclude_margin": (dict(groups=True, group_mode="exclude", false_negative_margin=0.0),
                       True, 10.0),
    "exclude_smoothing_dot": (dict(groups=True, group_mode="exclude", label_smoothing=0.2),
                              False, 0.5),
    "debias": (dict(debias_tau_plus=0.1), True, 10.0),
    "debias_dot": (dict(debias_tau_plus=0.4), False, 0.5),  # the floor binds on some rows
}


ERRORS = ("groups-length", "groups-dtype", "groups-some-ranks", "group_mode-differs",
          "margin-differs", "tau-differs", "margin-smoothing", "debias-groups", "ring-naive")


def layouts(world: int) -> dict:
    """Shard sizes per rank: even, and uneven ones that include a 1-pair shard."""
    return {"even": [4] * world, "uneven": {2: [5, 2], 3: [3, 6, 1]}[world]}


def cases(world: int, backend_names: list[str]) -> list[str]:
    """The case names, in the order every rank runs them."""
    names = []
    for backend in backend_names:
        for strategy in ("ring", "gather"):
            for layout in ("even", "uneven"):
                names += [f"loss-{backend}-{strategy}-{layout}-{s}" for s in SETTINGS]
        names += [f"loss-{backend}-ring-uneven-{s}-fp64"
                  for s in ("exclude_margin", "positives_smoothing", "debias_dot")]
        names += [f"frozen-{backend}-ring-{s}-{side}" for s in ("positives_smoothing", "exclude_margin")
                  for side in ("image", "text")]
    names += [f"loss-naive-gather-uneven-{s}" for s in ("exclude_margin", "positives", "debias")]
    names += ["nograd-ring-positives", "ddp-ring", "ddp-gather", "twice-same-graph"]
    names += [f"frozen-mixed-{strategy}-{s}" for strategy in ("ring", "gather")
              for s in ("smoothing", "positives", "exclude_smoothing_dot", "debias_dot")]
    names += [f"error-{what}" for what in ERRORS] + ["after-errors"]
    return names + (["memory-ring-options"] if world == 2 else [])


# --- the global batch and the single-process reference -----------------------------

def global_batch(sizes, dtype=torch.float32, seed=0):
    """(images, texts, group ids) of the global batch: pairs in groups of random sizes,
    members near a common centre, groups spread over the ranks; ids arbitrary (also
    negative, not consecutive). Pair 0's image is close to the last pair's text (a
    false negative across ranks, in another group)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    index = torch.randint(0, max(1, n // 2), (n,), generator=gen)
    centres = torch.randn(int(index.max()) + 1, D, generator=gen, dtype=torch.float64)
    a = centres[index] + 0.6 * torch.randn(n, D, generator=gen, dtype=torch.float64)
    b = centres[index] + 0.6 * torch.randn(n, D, generator=gen, dtype=torch.float64)
    a[0] = b[-1] + 0.05 * torch.randn(D, generator=gen, dtype=torch.float64)
    index[0] = index[-1] + 1  # not the last pair's group
    ids = index * 7 - 10
    return a.to(dtype), b.to(dtype), ids


def options_of(setting, ids, sizes, rank):
    """(contrastive_loss options with this rank's groups, normalize, scale)."""
    options, normalize, scale = SETTINGS[setting]
    options = dict(options)
    if options.get("groups"):
        options["groups"] = shard(ids, sizes, rank)
    return options, normalize, scale


def reference(a, b, scale, sizes, rank, options, normalize, dtype=torch.float64):
    """(loss, W * grad of the local images, W * grad of the local texts, grad of the scale)
    of the single-process loss with ``options`` (global groups) on the global batch."""
    import mmkernels

    world = len(sizes)
    ga, gb = leaf(a, dtype), leaf(b, dtype)
    s = leaf(torch.tensor(float(scale), dtype=dtype))
    loss = mmkernels.contrastive_loss(ga, gb, s, normalize=normalize, backend="naive", **options)
    grads = torch.autograd.grad(loss, (ga, gb, s))
    return (loss.detach(), world * shard(grads[0], sizes, rank),
            world * shard(grads[1], sizes, rank), grads[2])


def check(got, want, dtype, what):
    for name, g, w in zip(("loss", "image grad", "text grad", "logit_scale grad"), got, want):
        if w is None:
            assert g is None, f"{what} {name}: expected no gradient"
            continue
        assert g is not None, f"{what} {name}: no gradient"
        assert_matches(g, w, dtype, f"{what} {name}")


def run_ours(mmdist, a, b, scale, *, image_trains=True, text_trains=True, **kw):
    x, y = a.clone().requires_grad_(image_trains), b.clone().requires_grad_(text_trains)
    s = torch.tensor(float(scale), dtype=torch.float64 if a.dtype == torch.float64
                     else torch.float32, requires_grad=True)
    loss = mmdist.contrastive_loss(x, y, s, **kw)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad


# --- the cases -------------------------------------------------------------------

def loss_case(name, world, rank, mmdist):
    parts = name.split("-")  # loss-BACKEND-STRATEGY-LAYOUT-SETTING[-fp64]
    backend, strategy, layout, setting = parts[1:5]
    dtype = torch.float64 if parts[-1] == "fp64" else torch.float32
    sizes = layouts(world)[layout]
    a, b, ids = global_batch(sizes, dtype)
    options, normalize, scale = options_of(setting, ids, sizes, rank)
    got = run_ours(mmdist, shard(a, sizes, rank), shard(b, sizes, rank), scale,
                   strategy=strategy, normalize=normalize, backend=backend, **options)
    want = reference(a, b, scale, sizes, rank, _global_options(setting, ids), normalize)
    assert got[0].dtype == dtype
    check(got, want, dtype, name)


def _global_options(setting, ids):
    """The options of ``setting`` with the global batch's groups (the reference's)."""
    options = dict(SETTINGS[setting][0])
    if options.get("groups"):
        options["groups"] = ids
    return options


def frozen_case(name, world, rank, mmdist):
    """One tower frozen on every rank ("frozen-BACKEND-STRATEGY-SETTING-SIDE"), or, for
    "frozen-mixed-STRATEGY-SETTING", the image tower trained on rank 0 only: the
    gradients that exist are the full backward's (the scale's too), and no rank waits
    on a collective another skipped."""
    _, backend, strategy, setting, *side = name.split("-")
    side = side[0] if side else "mixed"
    backend = "auto" if backend == "mixed" else backend
    sizes = layouts(world)["uneven"]
    a, b, ids = global_batch(sizes)
    options, normalize, scale = options_of(setting, ids, sizes, rank)
    image_trains = {"image": False, "text": True, "mixed": rank == 0}[side]
    text_trains = side != "text"
    got = run_ours(mmdist, shard(a, sizes, rank), shard(b, sizes, rank), scale,
                   image_trains=image_trains, text_trains=text_trains, strategy=strategy,
                   normalize=normalize, backend=backend, **options)
    want = list(reference(a, b, scale, sizes, rank, _global_options(setting, ids), normalize))
    if not image_trains:
        want[1] = None
    if not text_trains:
        want[2] = None
    check(got, want, torch.float32, name)


def nograd_case(name, world, rank, mmdist):
    sizes = layouts(world)["uneven"]
    a, b, ids = global_batch(sizes)
    options, normalize, scale = options_of("positives_smoothing", ids, sizes, rank)
    with torch.no_grad():
        loss = mmdist.contrastive_loss(shard(a, sizes, rank), shard(b, sizes, rank), scale,
                                       normalize=normalize, **options)
    want = reference(a, b, scale, sizes, rank, _global_options("positives_smoothing", ids),
                     normalize)
    assert_matches(loss, want[0], torch.float32, name)


def ddp_case(name, world, rank, mmdist):
    """DDP's averaged parameter gradients equal the single-process global-batch ones
    (duplicates excluded with a margin, plus multi-positive groups with smoothing)."""
    import mmkernels

    strategy = name.split("-")[1]
    ids = torch.randint(0, 3, (sum(layouts(world)["uneven"]),),
                        generator=torch.Generator().manual_seed(3))
    settings = (dict(group_mode="exclude", false_negative_margin=0.5),
                dict(group_mode="positives", label_smoothing=0.1))

    def ours(fi, ft, s):
        mine = shard(ids, layouts(world)["uneven"], rank)
        return sum(mmdist.contrastive_loss(fi, ft, s, strategy=strategy, normalize=True,
                                           groups=mine, **kw) for kw in settings)

    def theirs(fi, ft, s):
        return sum(mmkernels.contrastive_loss(fi, ft, s, normalize=True, groups=ids,
                                              backend="naive", **kw) for kw in settings)

    ddp_matches_single_process(name, world, rank, ours, theirs)


def twice_case(name, world, rank, mmdist):
    """Three losses with different rings (masked, group sums, debiased) in one graph, one
    backward: their collectives run in one order on every rank."""
    sizes = layouts(world)["uneven"]
    a, b, ids = global_batch(sizes)
    x, y = leaf(shard(a, sizes, rank)), leaf(shard(b, sizes, rank))
    s = leaf(torch.tensor(10.0))
    settings = ("exclude_margin", "positives_smoothing", "debias")
    loss = sum(mmdist.contrastive_loss(x, y, s, normalize=True,
                                       **options_of(setting, ids, sizes, rank)[0])
               for setting in settings)
    loss.backward()
    wants = [reference(a, b, 10.0, sizes, rank, _global_options(setting, ids), True)
             for setting in settings]
    check((loss.detach(), x.grad, y.grad, s.grad), [sum(w) for w in zip(*wants)],
          torch.float32, name)


def error_case(name, world, rank, mmdist):
    sizes = layouts(world)["uneven"]
    a, b, ids = global_batch(sizes)
    la, lb, mine = shard(a, sizes, rank), shard(b, sizes, rank), shard(ids, sizes, rank)
    loss = mmdist.contrastive_loss
    what = name.split("-", 1)[1]
    if what == "groups-length":  # rank 1's ids lack one (rank 1 has >= 2 pairs in every layout)
        groups = mine[:-1] if rank == 1 else mine
        for strategy in ("ring", "gather"):
            if rank == 1:
                expect_error(lambda: loss(la, lb, groups=groups, strategy=strategy), ValueError,
                             "groups", f"({sizes[1]},)", "one global group id per local pair")
            else:
                expect_error(lambda: loss(la, lb, groups=groups, strategy=strategy), ValueError,
                             "rank(s) [1]")
    elif what == "groups-dtype":
        groups = mine.to(torch.int32) if rank == 0 else mine
        if rank == 0:
            expect_error(lambda: loss(la, lb, groups=groups), TypeError, "groups", "int64")
        else:
            expect_error(lambda: loss(la, lb, groups=groups), ValueError, "rank(s) [0]")
    elif what == "groups-some-ranks":
        expect_error(lambda: loss(la, lb, groups=mine if rank == 0 else None), ValueError,
                     "groups", "given on some ranks and not on others")
    elif what == "group_mode-differs":
        mode = "exclude" if rank == world - 1 else "positives"
        expect_error(lambda: loss(la, lb, groups=mine, group_mode=mode), ValueError,
                     "group_mode", "differs across ranks", f"rank {world - 1}: exclude")
        expect_error(lambda: loss(la, lb, groups=mine, group_mode="both"), ValueError,
                     "group_mode", "'both'")
    elif what == "margin-differs":
        margin = None if rank == 0 else 0.5
        expect_error(lambda: loss(la, lb, false_negative_margin=margin), ValueError,
                     "false_negative_margin", "differs across ranks")
        expect_error(lambda: loss(la, lb, false_negative_margin=0.1 * (rank + 1)), ValueError,
                     "false_negative_margin", "differs across ranks")
    elif what == "tau-differs":
        expect_error(lambda: loss(la, lb, debias_tau_plus=0.1 * (rank + 1)), ValueError,
                     "debias_tau_plus", "differs across ranks")
        expect_error(lambda: loss(la, lb, debias_tau_plus=1.0), ValueError, "debias_tau_plus",
                     "[0, 1)")
    elif what == "margin-smoothing":
        expect_error(lambda: loss(la, lb, false_negative_margin=0.5, label_smoothing=0.1),
                     ValueError, "false_negative_margin", "label_smoothing")
        expect_error(lambda: loss(la, lb, false_negative_margin=0.5, groups=mine), ValueError,
                     "false_negative_margin", "group_mode='exclude'")
    elif what == "debias-groups":
        expect_error(lambda: loss(la, lb, debias_tau_plus=0.1, groups=mine, group_mode="exclude"),
                     ValueError, "debias_tau_plus", "groups")
    elif what == "ring-naive":
        expect_error(lambda: loss(la, lb, groups=mine, group_mode="exclude", backend="naive"),
                     ValueError, "strategy='ring'", "naive")
    else:
        raise AssertionError(f"unknown error case {name}")


def after_errors_case(name, world, rank, mmdist):
    sizes = layouts(world)["uneven"]
    a, b, ids = global_batch(sizes)
    options, normalize, scale = options_of("exclude_margin", ids, sizes, rank)
    got = run_ours(mmdist, shard(a, sizes, rank), shard(b, sizes, rank), scale,
                   normalize=normalize, **options)
    check(got, reference(a, b, scale, sizes, rank, _global_options("exclude_margin", ids),
                         normalize), torch.float32, name)


MEMORY = {}


def memory_case(name, world, rank, mmdist):
    """Peak RSS of a ring fwd+bwd with each option stays O(local_N * D): far below the
    local rows' logits against the global batch (n x N fp32, what a materializing
    loss holds; tests/test_distributed.py's memory case sees the probe catch those)."""
    from memory_probe import reset_peak, rss_mib

    from mmkernels.ops import _common

    _common.TILE_SHAPE = DEFAULT_TILES  # the library's tiles: the test tiles would take minutes
    n, d = 4096, 64  # global N = 8192: the local rows' logits alone are 128 MiB
    gen = torch.Generator().manual_seed(rank)
    la = torch.randn(n, d, generator=gen).requires_grad_()
    lb = torch.randn(n, d, generator=gen).requires_grad_()
    groups = torch.randint(0, n * world // 3, (n,), generator=torch.Generator().manual_seed(5 + rank))
    settings = {"exclude_margin": dict(groups=groups, group_mode="exclude", false_negative_margin=0.5),
                "positives_smoothing": dict(groups=groups, label_smoothing=0.1),
                "debias_dot": dict(debias_tau_plus=0.1)}
    for setting, options in settings.items():
        la.grad = lb.grad = None
        base = rss_mib("VmRSS")
        reset_peak()
        mmdist.contrastive_loss(la, lb, 10.0, normalize=setting != "debias_dot",
                                **options).backward()
        MEMORY[setting] = rss_mib("VmHWM") - base
    local_logits = n * world * n * 4 / 2**20
    print(f"rank {rank} memory peaks (MiB): {MEMORY}; local logits {local_logits:.0f} MiB",
          flush=True)
    for setting, peak in MEMORY.items():
        assert peak < 48, f"{setting}: ring fwd+bwd added {peak:.1f} MiB (logits {local_logits:.0f})"


CASES = (("loss-", loss_case), ("frozen-", frozen_case), ("nograd-", nograd_case),
         ("ddp-", ddp_case), ("twice-", twice_case), ("error-", error_case),
         ("after-errors", after_errors_case), ("memory-", memory_case))


def main():
    world, rank, out_dir, backend_names = join_world()
    from mmkernels import distributed as mmdist

    global DEFAULT_TILES
    DEFAULT_TILES = use_test_tiles(TILES)
    run_and_report(cases(world, backend_names),
                   lambda name: run_by_prefix(name, CASES, world, rank, mmdist),
                   rank, out_dir, _memory_mib=MEMORY)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
