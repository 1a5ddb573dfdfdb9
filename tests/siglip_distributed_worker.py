"""One rank of the distributed SigLIP tests (tests/test_siglip_distributed.py).

    python tests/siglip_distributed_worker.py RANK WORLD_SIZE STORE_PORT BACKENDS

Joins a gloo group through the TCP store the test holds on 127.0.0.1, then, for
every case, checks this rank's loss and gradients from mmkernels (SigLipLoss
and siglip_loss_distributed) against (1) the fp64 single-process result for
this rank, computed here from the whole global batch, and (2) open_clip's
SigLipLoss run distributed with the same dist_impl; and measures the bytes the
autograd graph saves. Mismatches are collected, not raised, so every rank
keeps taking part in the collectives; one JSON line reports them.
"""

import datetime
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import mmkernels
import siglip_reference as reference
from mmkernels.ops import _common
from mmkernels.distributed import siglip_loss_distributed
from tolerances import assert_matches, fp32_logit_rtol



def _open_clip_loss_module():
    """open_clip's loss.py alone: it imports only torch, and the package's __init__
    (models, tokenizers, torchvision) would cost each rank ~5 s of CPU at start-up."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


OpenClipSigLipLoss = _open_clip_loss_module().SigLipLoss

N, D = 5, 7  # rows per rank and features: odd, and straddling the tiles below
TILES = {"cpu": (2, 3)}


def global_batch(world, scale_features=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(world * N, D, generator=gen, dtype=torch.float64) * scale_features
    t = torch.randn(world * N, D, generator=gen, dtype=torch.float64) * scale_features
    return a, t


def expected(a, t, scale, bias, rank, world, normalize, reduction, weights, exact_scalars=False):
    """fp64, one process: this rank's loss and the gradients open_clip gives this rank
    (texts: of every rank's loss; images and scalars: of this rank's loss)."""
    a, t = a.clone().requires_grad_(), t.clone().requires_grad_()
    # The scalars as run() makes them (fp32 leaves unless the features are fp64), exactly.
    s, b = (torch.tensor(v, dtype=torch.float64 if exact_scalars else torch.float32).double().requires_grad_()
            for v in (scale, bias))
    rows = reference.siglip_rows(a, t, s, b, normalize).view(world, N)
    per_rank = rows.sum(1) / N if reduction == "mean" else (rows * weights.view(world, N)).sum(1)
    grad_a, grad_t = torch.autograd.grad(per_rank.sum(), (a, t), retain_graph=True)
    grad_s, grad_b = torch.autograd.grad(per_rank[rank], (s, b))
    mine = slice(rank * N, (rank + 1) * N)
    value = per_rank[rank] if reduction == "mean" else rows[rank]
    return value.detach(), grad_a[mine], grad_t[mine], grad_s, grad_b


def run(loss_fn, a, t, scale, bias, rank, reduction, weights):
    """(value, grad a, grad t, grad scale, grad bias, bytes saved by autograd) on this rank.
    The scalars are fp32 leaves, as in training (fp64 for fp64 features: exactness runs)."""
    a, t = a.clone().requires_grad_(), t.clone().requires_grad_()
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    s, b = (torch.tensor(v, dtype=dtype, requires_grad=True) for v in (scale, bias))
    saved = [0]

    def pack(x):
        saved[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = loss_fn(a, t, s, b)
    out = out["contrastive_loss"] if isinstance(out, dict) else out
    objective = out if reduction == "mean" else (out * weights[rank * N:(rank + 1) * N].to(out)).sum()
    objective.backward()
    return out.detach(), a.grad, t.grad, s.grad, b.grad, saved[0]


NAMES = ("loss", "grad image", "grad text", "grad scale", "grad bias")


def main():
    rank, world, port, backends = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    start = time.perf_counter()
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    _common.TILE_SHAPE = TILES
    failures, checked, saved = [], 0, {}

    def check(what, fn):
        nonlocal checked
        try:
            fn()
            checked += 1
        except Exception:  # noqa: BLE001 - collected, so the other ranks are not left waiting
            failures.append(f"rank {rank}, {what}: {traceback.format_exc(limit=2)}")

    weights = torch.randn(world * N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a64, t64 = global_batch(world)
    mine = slice(rank * N, (rank + 1) * N)
    scale, bias = 7.3, -4.1

    for k, backend in enumerate(backends.split(",")):
        # Every dtype on the first (best) backend; the ring code is the same for the others.
        dtypes = (torch.float32, torch.float64, torch.bfloat16) if k == 0 else (torch.float32,)
        for impl in mmkernels.SigLipLoss.DIST_IMPLS:
            ours_module = mmkernels.SigLipLoss(rank=rank, world_size=world, dist_impl=impl,
                                               backend=backend)
            theirs_module = OpenClipSigLipLoss(rank=rank, world_size=world, dist_impl=impl)
            for dtype in dtypes:
                if dtype != torch.float32 and impl in ("reduce", "gather"):
                    continue  # same ring as bidir: one dtype is enough
                a, t = a64[mine].to(dtype), t64[mine].to(dtype)
                want = expected(a64.to(dtype).double(), t64.to(dtype).double(), scale, bias, rank,
                                world, False, "mean", None, exact_scalars=dtype == torch.float64)
                got = run(ours_module, a, t, scale, bias, rank, "mean", None)
                theirs = run(theirs_module, a, t, scale, bias, rank, "mean", None)
                for name, g, w, o in zip(NAMES, got, want, theirs):
                    check(f"{backend} {impl} {dtype} {name} vs fp64",
                          lambda: assert_matches(g, w, dtype, name, o))
                    if dtype != torch.bfloat16:  # open_clip computes bf16 logits in bf16
                        check(f"{backend} {impl} {dtype} {name} vs open_clip",
                              lambda: torch.testing.assert_close(
                                  g.to(o.dtype), o, rtol=2e-5, atol=2e-5 * o.abs().max().item()))
                if dtype == torch.float32:
                    saved[f"{backend} {impl}"] = {"mmkernels": got[5], "open_clip": theirs[5]}

        # Through the function: normalized, per-row losses, both exchanges.
        for exchange in ("bidir", "shift"):
            def fn(a, t, s, b):
                return siglip_loss_distributed(a, t, s, b, exchange=exchange, normalize=True,
                                               reduction="none", backend=backend)

            want = expected(a64.float().double(), t64.float().double(), 3.0, 1.5, rank, world,
                            True, "none", weights)
            got = run(fn, a64[mine].float(), t64[mine].float(), 3.0, 1.5, rank, "none", weights)
            for name, g, w in zip(NAMES, got, want):
                check(f"{backend} {exchange} normalize none {name}",
                      lambda: assert_matches(g, w, torch.float32, name))

        # Logit scale 100 on unnormalized features, bias -10.
        big_a, big_t = global_batch(world, scale_features=3.0, seed=2)
        largest = (100 * big_a @ big_t.T).abs().max().item()
        want = expected(big_a.float().double(), big_t.float().double(), 100.0, -10.0, rank, world,
                        False, "mean", None)
        got = run(mmkernels.SigLipLoss(rank=rank, world_size=world, backend=backend),
                  big_a[mine].float(), big_t[mine].float(), 100.0, -10.0, rank, "mean", None)
        for name, g, w in zip(NAMES, got, want):
            check(f"{backend} scale 100 {name}",
                  lambda: assert_matches(g, w, torch.float32, name, rtol=fp32_logit_rtol(largest)))

    # A module whose rank does not match the process group says so.
    try:
        mmkernels.SigLipLoss(rank=(rank + 1) % world, world_size=world)(a64[mine], t64[mine], 1.0, 0.0)
        failures.append(f"rank {rank}: a wrong rank was not reported")
    except ValueError as error:
        checked += "rank=" in str(error)

    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "checked": checked, "failures": failures, "saved_bytes": saved,
                      "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
