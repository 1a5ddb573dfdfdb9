"""One rank of the distributed tests (tests/test_distributed.py starts W of them).

    python tests/distributed_worker.py WORLD RANK STORE_PORT OUT_DIR BACKEND[,BACKEND...]

Joins a gloo process group through the parent's TCPStore on 127.0.0.1, runs
every case of :func:`cases` in order (the same order on every rank: the cases
are collective) and writes ``OUT_DIR/rank<RANK>.json``: case name -> null when
the case passed on this rank, else the failure. The global batch is drawn from
a seed shared by every rank; each rank checks its own loss and gradients
against the fp64 single-process reference on the concatenated batch
(tests/reference.py), and, where open_clip is importable, against open_clip's
ClipLoss run in the same processes.
"""

from __future__ import annotations

import time

_IMPORTED_AT = time.perf_counter()

import datetime
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference  # noqa: E402
from tolerances import assert_matches, fp32_logit_rtol  # noqa: E402

D = 12
TILES = (4, 8)  # torch backend tiles, so even these small shards straddle tile edges
DEFAULT_TILES = None  # the library's tile shapes, restored for the memory case


def layouts(world: int) -> dict:
    """Shard sizes per rank: even, and uneven ones that include a 1-row shard."""
    uneven = {2: [5, 2], 3: [3, 6, 1], 4: [2, 5, 1, 4]}[world]
    return {"even": [4] * world, "uneven": uneven}


def cases(world: int, backend_names: list[str]) -> list[str]:
    """The case names, in the order every rank runs them."""
    names = []
    for backend in backend_names:
        for strategy in ("ring", "gather"):
            for layout in ("even", "uneven"):
                for setting in ("plain", "normalize_smoothing"):
                    names.append(f"loss-{backend}-{strategy}-{layout}-{setting}")
        names += [f"loss-{backend}-ring-uneven-fp64", f"loss-{backend}-ring-uneven-bf16",
                  f"loss-{backend}-gather-uneven-fp16",
                  f"loss-{backend}-ring-uneven-scale100", f"loss-{backend}-ring-uneven-noncontiguous",
                  f"loss-{backend}-ring-uneven-nograd",
                  f"loss-{backend}-ring-uneven-frozen_image", f"loss-{backend}-ring-uneven-frozen_text"]
    names += ["loss-naive-gather-uneven-normalize_smoothing", "loss-ring-twice-same-graph"]
    if world >= 3:
        names.append("loss-subgroup-without-rank-0")
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            for layout in ("even", "uneven"):
                names.append(f"cliploss-local{int(local_loss)}-grad{int(gather_with_grad)}-{layout}")
    names += ["cliploss-output_dict-logit_bias", "ddp-ring", "ddp-gather"]
    names += ["error-mismatched-D", "error-mismatched-dtype", "error-invalid-on-one-rank",
              "error-mismatched-logit_scale", "error-ring-naive", "error-cliploss-rank",
              "after-errors-group-still-works"]
    if world == 2:
        names.append("memory-ring-flat")
    return names


# --- the global batch and its fp64 reference ------------------------------------

def global_batch(sizes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    a = torch.randn(n, D, generator=gen, dtype=torch.float64)
    b = torch.randn(n, D, generator=gen, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def shard(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def leaf(x, dtype=None):
    return x.detach().to(dtype or x.dtype).clone().requires_grad_(True)


def reference_global(a, b, scale, sizes, rank, *, normalize=False, label_smoothing=0.0,
                     dtype=torch.float64, multiplier=None):
    """(loss, grad of the local image rows, of the local text rows, of scale) of the
    single-process loss on the concatenated batch; feature gradients times
    ``multiplier`` (default W: open_clip's gather_with_grad semantics)."""
    multiplier = len(sizes) if multiplier is None else multiplier
    a, b = leaf(a, dtype), leaf(b, dtype)
    s = leaf(torch.as_tensor(scale, dtype=torch.float64), dtype)
    loss = reference.contrastive(a, b, s, normalize, label_smoothing)
    ga, gb, gs = torch.autograd.grad(loss, (a, b, s))
    return (loss.detach(), multiplier * shard(ga, sizes, rank), multiplier * shard(gb, sizes, rank),
            gs)


def reference_local_loss(a, b, scale, sizes, rank, gather_with_grad):
    """open_clip's local_loss=True on one process, fp64: this rank's rows against the
    whole batch, labels = their global indices. With gather_with_grad the gathered
    copies carry gradient, summed over every rank's loss; without, they do not."""
    a, b = leaf(a, torch.float64), leaf(b, torch.float64)
    s = leaf(torch.tensor(float(scale), dtype=torch.float64))

    def local(q, keys_a, keys_b):
        ar, br = shard(a, sizes, q), shard(b, sizes, q)
        labels = sum(sizes[:q]) + torch.arange(sizes[q])
        return (F.cross_entropy(s * ar @ keys_b.T, labels)
                + F.cross_entropy(s * br @ keys_a.T, labels)) / 2

    if gather_with_grad:
        mine = local(rank, a, b)
        everyone = sum(local(q, a, b) for q in range(len(sizes)))
        ga, gb = torch.autograd.grad(everyone, (a, b))
        (gs,) = torch.autograd.grad(mine, (s,))
    else:
        mine = local(rank, a.detach(), b.detach())
        ga, gb, gs = torch.autograd.grad(mine, (a, b, s))
    return mine.detach(), shard(ga, sizes, rank), shard(gb, sizes, rank), gs


def check(got, want, dtype, what, same_dtype=None, rtol=None):
    """Loss and gradients vs the reference (tests/tolerances.py)."""
    names = ("loss", "image grad", "text grad", "logit_scale grad")
    same_dtype = same_dtype or (None,) * len(want)
    for name, g, w, s in zip(names, got, want, same_dtype):
        if w is None:
            assert g is None, f"{what} {name}: expected no gradient"
            continue
        assert g is not None, f"{what} {name}: no gradient"
        assert_matches(g, w, dtype, f"{what} {name}", s, rtol)


def run_ours(fn, a, b, scale, *, backward=True):
    a, b = leaf(a), leaf(b)
    s = leaf(scale) if isinstance(scale, torch.Tensor) else scale
    out = fn(a, b, s)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    if not backward:
        return loss.detach(), None, None, None
    loss.backward()
    return loss.detach(), a.grad, b.grad, (s.grad if isinstance(s, torch.Tensor) else None)


# --- the cases -------------------------------------------------------------------

def products_computed(backend):
    """{"S", "pb", "pa"}: N x M x D products the backward kernels computed so far."""
    if backend == "cpu":
        from mmkernels import compiled
        return dict(zip(("S", "pb", "pa"), compiled.products_computed()))
    from mmkernels.ops import masked_logsumexp
    return {k: masked_logsumexp.PRODUCTS_COMPUTED[k] for k in ("S", "pb", "pa")}


def frozen_side_case(name, ours, a, b, la, lb, scale, sizes, rank, world, backend):
    """One tower frozen on every rank (locked-image tuning, or a frozen text tower):
    the trainable side's and the scale's gradients equal the full backward's, and
    the ring's kernels compute no product for the frozen side (W products of S per
    rank, and W of the trainable side's)."""
    frozen_image = name.endswith("frozen_image")
    x, y = la.clone().requires_grad_(not frozen_image), lb.clone().requires_grad_(frozen_image)
    s = scale.clone().requires_grad_()
    before = products_computed(backend)
    loss = ours(x, y, s)
    loss.backward()
    after = products_computed(backend)
    want = reference_global(a, b, scale, sizes, rank)
    got = (loss.detach(), None if frozen_image else x.grad, y.grad if frozen_image else None, s.grad)
    check(got, (want[0], None if frozen_image else want[1], want[2] if frozen_image else None,
                want[3]), torch.float32, name)
    counts = {k: after[k] - before[k] for k in after}
    assert counts == {"S": world, "pb": 0 if frozen_image else world,
                      "pa": world if frozen_image else 0}, f"{name}: products {counts}"


def loss_case(name, world, rank, mmdist):
    _, backend, strategy, layout, setting = name.split("-")
    sizes = layouts(world)[layout]
    dtype = {"fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        setting, torch.float32)
    normalize = setting in ("normalize_smoothing", "fp64", "bf16", "fp16")
    smoothing = 0.1 if setting in ("normalize_smoothing", "fp64") else 0.0
    scale = 100.0 if setting == "scale100" else torch.tensor(
        14.3 if normalize else 2.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    a, b = global_batch(sizes, dtype)
    la, lb = shard(a, sizes, rank), shard(b, sizes, rank)
    if setting == "noncontiguous":  # every other column of a wider buffer: stride (2D, 2)
        la, lb = (torch.stack([x, torch.zeros_like(x)], 2).flatten(1)[:, ::2] for x in (la, lb))
        assert not la.is_contiguous() and torch.equal(la, shard(a, sizes, rank))

    def ours(x, y, s):
        return mmdist.contrastive_loss(x, y, s, strategy=strategy, normalize=normalize,
                                       label_smoothing=smoothing, backend=backend)

    if setting.startswith("frozen"):
        frozen_side_case(name, ours, a, b, la, lb, scale, sizes, rank, world, backend)
        return
    if setting == "nograd":
        with torch.no_grad():
            got = run_ours(ours, la, lb, scale, backward=False)
        want = reference_global(a, b, scale, sizes, rank)
        assert_matches(got[0], want[0], dtype, "no_grad loss")
        return
    got = run_ours(ours, la, lb, scale)
    want = reference_global(a, b, scale, sizes, rank, normalize=normalize,
                            label_smoothing=smoothing)
    if not isinstance(scale, torch.Tensor):
        want = want[:3] + (None,)
    same = None
    if dtype in (torch.bfloat16, torch.float16):  # PyTorch's own error in that dtype sets the bar
        same = reference_global(a, b, scale, sizes, rank, normalize=normalize,
                                label_smoothing=smoothing, dtype=dtype)
    rtol = None
    if setting == "scale100":  # unnormalized logits far beyond CLIP's |S| <= 100
        rtol = fp32_logit_rtol((100.0 * a.double() @ b.double().T).abs().max().item())
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for g, x in zip(got[1:3], (la, lb)):
        assert g.dtype == x.dtype, f"gradient dtype {g.dtype}, input {x.dtype}"
    check(got, want, dtype, name, same, rtol)


def naive_case(name, world, rank, mmdist):
    sizes = layouts(world)["uneven"]
    a, b = global_batch(sizes)
    got = run_ours(lambda x, y, s: mmdist.contrastive_loss(
        x, y, s, strategy="gather", normalize=True, label_smoothing=0.1, backend="naive"),
        shard(a, sizes, rank), shard(b, sizes, rank), torch.tensor(14.3))
    want = reference_global(a, b, 14.3, sizes, rank, normalize=True, label_smoothing=0.1)
    check(got, want, torch.float32, name)


def twice_case(name, world, rank, mmdist):
    """Two ring losses in one graph (a sum), one backward: the backward's
    collectives of both run in the same order on every rank."""
    sizes = layouts(world)["uneven"]
    a, b = global_batch(sizes)
    la, lb, s = leaf(shard(a, sizes, rank)), leaf(shard(b, sizes, rank)), leaf(torch.tensor(3.0))
    loss = (mmdist.contrastive_loss(la, lb, s)
            + mmdist.contrastive_loss(la, lb, s, normalize=True, strategy="gather"))
    loss.backward()
    r1 = reference_global(a, b, 3.0, sizes, rank)
    r2 = reference_global(a, b, 3.0, sizes, rank, normalize=True)
    want = tuple(x + y for x, y in zip(r1, r2))
    check((loss.detach(), la.grad, lb.grad, s.grad), want, torch.float32, name)


def subgroup_case(name, world, rank, mmdist):
    """A group of ranks 1 .. W-1: group ranks differ from global ranks."""
    members = list(range(1, world))
    group = dist.new_group(members)  # collective over the default group: rank 0 too
    if rank == 0:
        return
    sizes = layouts(len(members))["uneven"]
    a, b = global_batch(sizes)
    mine = members.index(rank)
    for strategy in ("ring", "gather"):
        got = run_ours(lambda x, y, s: mmdist.contrastive_loss(
            x, y, s, group=group, strategy=strategy, normalize=True),
            shard(a, sizes, mine), shard(b, sizes, mine), torch.tensor(14.3))
        want = reference_global(a, b, 14.3, sizes, mine, normalize=True)
        check(got, want, torch.float32, f"{name} {strategy}")


def open_clip_loss_module():
    """open_clip's loss.py alone: its package __init__ loads models and tokenizers
    (seconds per process), and loss.py needs only torch."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).with_name("loss.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_loss_only", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def cliploss_case(name, world, rank, mmkernels, open_clip_loss):
    _, local, grad, layout = name.split("-")
    local_loss, gather_with_grad = local == "local1", grad == "grad1"
    sizes = layouts(world)[layout]
    a, b = global_batch(sizes)
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    la, lb, scale = shard(a, sizes, rank), shard(b, sizes, rank), torch.tensor(14.3)
    flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                 rank=rank, world_size=world)
    ours_module = mmkernels.ClipLoss(**flags)
    got = run_ours(ours_module, la, lb, scale)
    got_again = run_ours(ours_module, la, lb, scale)  # cached labels (open_clip) change nothing
    for x, y in zip(got, got_again):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    if local_loss:
        want = reference_local_loss(a, b, 14.3, sizes, rank, gather_with_grad)
    else:
        want = reference_global(a, b, 14.3, sizes, rank,
                                multiplier=world if gather_with_grad else 1)
    check(got, want, torch.float32, f"{name} vs fp64 reference")
    # open_clip gathers with all_gather, which needs equal shards.
    if open_clip_loss is not None and layout == "even":
        theirs = run_ours(open_clip_loss.ClipLoss(**flags), la, lb, scale)
        for what, g, t in zip(("loss", "image grad", "text grad", "logit_scale grad"), got, theirs):
            torch.testing.assert_close(g, t, rtol=2e-5, atol=5e-6, msg=f"{name} vs open_clip: {what}")


def output_dict_case(name, world, rank, mmkernels):
    sizes = layouts(world)["even"]
    a, b = global_batch(sizes)
    la, lb = leaf(shard(a, sizes, rank)), leaf(shard(b, sizes, rank))
    bias = torch.tensor(-2.0, requires_grad=True)
    out = mmkernels.ClipLoss(gather_with_grad=True, rank=rank, world_size=world)(
        la, lb, torch.tensor(2.5), bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    out["contrastive_loss"].backward()
    want = reference_global(a, b, 2.5, sizes, rank)
    check((out["contrastive_loss"].detach(), la.grad, lb.grad), want[:3], torch.float32, name)
    assert bias.grad is not None and bias.grad.item() == 0.0


class TwoTowers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(7, D)
        self.text = torch.nn.Linear(5, D)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, y):
        return self.image(x), self.text(y), self.log_scale.exp()


def ddp_matches_single_process(name, world, rank, ours, theirs):
    """DDP's averaged parameter gradients equal the single-process full-batch ones:
    ``ours(image_features, text_features, scale)`` of this rank's shard (uneven
    shards) through DDP against ``theirs(...)`` of the whole batch in fp64."""
    sizes = layouts(world)["uneven"]
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(sum(sizes), 7, generator=gen), torch.randn(sum(sizes), 5, generator=gen)
    torch.manual_seed(2)
    model = TwoTowers()
    single = TwoTowers().double()
    single.load_state_dict(model.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss = ours(*ddp(shard(x, sizes, rank), shard(y, sizes, rank)))
    loss.backward()
    want = theirs(*single(x.double(), y.double()))
    want.backward()
    assert_matches(loss.detach(), want.detach(), torch.float32, f"{name} loss")
    for (pname, p), q in zip(model.named_parameters(), single.parameters()):
        assert_matches(p.grad, q.grad, torch.float32, f"{name} grad of {pname}")


def ddp_case(name, world, rank, mmdist):
    strategy = name.split("-")[1]
    ddp_matches_single_process(
        name, world, rank,
        lambda fi, ft, s: mmdist.contrastive_loss(fi, ft, s, strategy=strategy, normalize=True,
                                                  label_smoothing=0.05),
        lambda fi, ft, s: reference.contrastive(fi, ft, s, True, 0.05))


def expect_error(fn, kind, *words):
    try:
        fn()
    except kind as exc:
        message = str(exc)
        missing = [w for w in words if w not in message]
        assert not missing, f"error message {message!r} lacks {missing}"
        return
    raise AssertionError(f"expected {kind.__name__}, got no error")


def error_case(name, world, rank, mmkernels, mmdist):
    sizes = layouts(world)["uneven"]
    a, b = global_batch(sizes)
    la, lb = shard(a, sizes, rank), shard(b, sizes, rank)
    what = name.split("-", 1)[1]
    if what == "mismatched-D":
        d = D + 1 if rank == 0 else D
        for strategy in ("ring", "gather"):
            expect_error(lambda: mmdist.contrastive_loss(torch.randn(3, d), torch.randn(3, d),
                                                         strategy=strategy),
                         ValueError, "feature dimension D differs", f"rank 0: {D + 1}", f"rank 1: {D}")
    elif what == "mismatched-dtype":
        dtype = torch.float64 if rank == world - 1 else torch.float32
        expect_error(lambda: mmdist.contrastive_loss(la.to(dtype), lb.to(dtype)),
                     ValueError, "dtype differs", f"rank {world - 1}: torch.float64")
        expect_error(lambda: mmdist.contrastive_loss(la.to(dtype), lb.to(dtype)), TypeError)
    elif what == "invalid-on-one-rank":
        text = lb[:-1] if rank == 1 else lb  # rank 1 holds more than one row in every layout
        if rank == 1:
            expect_error(lambda: mmdist.contrastive_loss(la, text), ValueError, "batch sizes differ")
        else:
            expect_error(lambda: mmdist.contrastive_loss(la, text), ValueError, "rank(s) [1]")
    elif what == "mismatched-logit_scale":
        expect_error(lambda: mmdist.contrastive_loss(la, lb, 1.0 + rank), ValueError,
                     "logit_scale", "differs across ranks")
    elif what == "ring-naive":
        expect_error(lambda: mmdist.contrastive_loss(la, lb, backend="naive"), ValueError,
                     "strategy='ring'", "naive")
    elif what == "cliploss-rank":
        claimed = 0  # every rank claims rank 0: all but rank 0 are misconfigured
        loss = mmkernels.ClipLoss(rank=claimed, world_size=world)
        words = ("process group has this process as rank",) if rank else ("rank(s) [1",)
        expect_error(lambda: loss(la, lb, 2.0), ValueError, *words)
    else:
        raise AssertionError(f"unknown error case {name}")


def after_errors_case(name, world, rank, mmdist):
    sizes = layouts(world)["uneven"]
    a, b = global_batch(sizes)
    got = run_ours(mmdist.contrastive_loss, shard(a, sizes, rank), shard(b, sizes, rank),
                   torch.tensor(2.5))
    check(got, reference_global(a, b, 2.5, sizes, rank), torch.float32, name)


def memory_case(name, world, rank, mmdist):
    """Peak RSS of a ring fwd+bwd stays O(local_N * D): far below the n_r x N
    logits that a materializing gather holds (which the same probe must see)."""
    from memory_probe import reset_peak, rss_mib

    from mmkernels.ops import _common

    _common.TILE_SHAPE = DEFAULT_TILES  # real tiles: the small test tiles would take minutes
    n, d = 4096, 64  # global N = 8192: the local rows' logits alone are 128 MiB
    gen = torch.Generator().manual_seed(rank)
    la = torch.randn(n, d, generator=gen).requires_grad_()
    lb = torch.randn(n, d, generator=gen).requires_grad_()
    peaks = {}
    for strategy, backend in (("ring", "auto"), ("gather", "naive")):
        la.grad = lb.grad = None
        base = rss_mib("VmRSS")
        reset_peak()
        mmdist.contrastive_loss(la, lb, 10.0, strategy=strategy, backend=backend,
                                normalize=True).backward()
        peaks[strategy] = rss_mib("VmHWM") - base
    local_logits = n * world * n * 4 / 2**20
    print(f"rank {rank} memory peaks (MiB): {peaks}", flush=True)
    assert peaks["gather"] > local_logits, f"the probe missed the gathered logits: {peaks}"
    assert peaks["ring"] < 48, f"ring fwd+bwd added {peaks['ring']:.0f} MiB (logits: {local_logits:.0f})"


def run_case(name, world, rank, mmkernels, mmdist, open_clip_loss):
    if name.startswith("loss-naive"):
        return naive_case(name, world, rank, mmdist)
    if name == "loss-ring-twice-same-graph":
        return twice_case(name, world, rank, mmdist)
    if name == "loss-subgroup-without-rank-0":
        return subgroup_case(name, world, rank, mmdist)
    if name.startswith("loss-"):
        return loss_case(name, world, rank, mmdist)
    if name == "cliploss-output_dict-logit_bias":
        return output_dict_case(name, world, rank, mmkernels)
    if name.startswith("cliploss-"):
        return cliploss_case(name, world, rank, mmkernels, open_clip_loss)
    if name.startswith("ddp-"):
        return ddp_case(name, world, rank, mmdist)
    if name.startswith("error-"):
        return error_case(name, world, rank, mmkernels, mmdist)
    if name.startswith("after-errors"):
        return after_errors_case(name, world, rank, mmdist)
    if name.startswith("memory-"):
        return memory_case(name, world, rank, mmdist)
    raise AssertionError(f"unknown case {name}")


def join_world():
    """(world, rank, out_dir, backend names) of this worker, from its command line,
    once it has joined its gloo group."""
    world, rank, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    backend_names = [name for name in sys.argv[5].split(",") if name]
    torch.set_num_threads(1)  # W processes share the machine's cores
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    return world, rank, out_dir, backend_names


def use_test_tiles(tiles: tuple) -> dict:
    """The torch backend's tiles set to ``tiles`` on every device (small tiles: small
    shards straddle tile edges); returns the library's, for a case that needs them."""
    from mmkernels.ops import _common

    default, _common.TILE_SHAPE = _common.TILE_SHAPE, {"cpu": tiles, "cuda": tiles}
    return default


def run_by_prefix(name: str, table, *args):
    """Run the case ``name`` by the first (prefix, function) of ``table`` it starts with:
    ``function(name, *args)``."""
    for prefix, run in table:
        if name.startswith(prefix):
            return run(name, *args)
    raise AssertionError(f"unknown case {name}")


def run_and_report(names, run_one, rank: int, out_dir: str, seconds: dict | None = None, **extra):
    """Run each case ``run_one(name)`` (seed 0), recording its traceback or None and its
    time, then write this rank's report (plus ``extra`` fields) and leave the group."""
    results, seconds = {}, dict(seconds or {})
    for name in names:
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            run_one(name)
            results[name] = None
        except Exception:  # recorded; the parent's test for this case fails with it
            results[name] = traceback.format_exc(limit=6)
        seconds[name] = time.perf_counter() - start
    results.update(extra, _seconds=seconds)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main():
    world, rank, out_dir, backend_names = join_world()
    import mmkernels
    from mmkernels import distributed as mmdist

    global DEFAULT_TILES
    DEFAULT_TILES = use_test_tiles(TILES)
    open_clip_loss = open_clip_loss_module()
    run_and_report(cases(world, backend_names),
                   lambda name: run_case(name, world, rank, mmkernels, mmdist, open_clip_loss),
                   rank, out_dir, seconds={"startup": time.perf_counter() - _IMPORTED_AT},
                   _open_clip=open_clip_loss is not None)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
