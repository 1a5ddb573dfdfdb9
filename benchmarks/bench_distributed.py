"""Benchmark of the distributed loss: per-rank peak memory and time, over gloo on CPU.

    python -m benchmarks.bench_distributed [--world 4] [--n 2048 4096 8192 16384] [--d 256]
                                           [--impl ring gather open_clip open_clip_local]
                                           [--weak 2048] [--reps 3] [--quick] [--no-save]

For each implementation and global batch N, W processes (ranks) join a gloo
group on 127.0.0.1, each with N / W pairs, and run the contrastive loss
forward + backward. Each rank measures itself: the peak RSS that one step
adds beyond its inputs and their gradients (VmHWM after a reset, Linux) and
the wall time of a step (median of ``reps`` after a warm-up); a row reports the
largest over ranks. Implementations:

- ``ring``: mmkernels.distributed.contrastive_loss(strategy="ring")
- ``gather``: mmkernels.distributed.contrastive_loss(strategy="gather")
- ``open_clip``: open_clip's ClipLoss(gather_with_grad=True): all-gather, then the
  whole N x N logits on every rank (its default global loss)
- ``open_clip_local``: open_clip's ClipLoss(local_loss=True, gather_with_grad=True):
  the local rows' (N / W) x N logits

``--weak LOCAL_N`` adds a weak-scaling sweep: LOCAL_N pairs per rank for W = 2
.. --world, so the global batch grows with W while each rank's share does not:
the ring's memory per rank stays flat, the gather's grows with N.
The open_clip implementations are skipped where their logits alone would pass
``--max-logits-gib`` per rank (the machine is shared).

Time and memory are measured in separate groups of fresh processes. The timed
steps run with glibc's default allocator. The memory step runs with glibc's
mmap threshold fixed at its initial 128 KiB (``MALLOC_MMAP_THRESHOLD_``), so
that every large tensor is its own mapping, returned on free, and the peak
RSS tracks the live tensors. With glibc's dynamic threshold
(``--glibc-default``), freed buffers of a few MiB stay in the heap and the
peak also counts what the allocator kept: for the ring it grows with W (more
steps, more freed buffers kept) although the live tensors do not. Every
implementation is measured the same way.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import common

MODULE = "benchmarks.bench_distributed"
IMPLEMENTATIONS = ("ring", "gather", "open_clip", "open_clip_local")
MMAP_THRESHOLD = 128 * 1024  # glibc's initial M_MMAP_THRESHOLD, fixed for the memory step


def logits_gib(impl: str, n: int, world: int) -> float:
    """fp32 logits one rank materializes (0 for the tiled implementations)."""
    rows = {"open_clip": n, "open_clip_local": 2 * n // world}.get(impl, 0)
    return rows * n * 4 / 2**30


# --- child: one rank -------------------------------------------------------------

def _loss_fn(impl: str, rank: int, world: int):
    if impl in ("ring", "gather"):
        from mmkernels import distributed

        return lambda a, b, s: distributed.contrastive_loss(a, b, s, strategy=impl)
    loss = _open_clip_loss_module().ClipLoss(local_loss=impl == "open_clip_local",
                                             gather_with_grad=True, rank=rank, world_size=world)
    return lambda a, b, s: loss(a, b, s)


def _open_clip_loss_module():
    """open_clip's loss.py alone (None if open_clip is not installed): its package
    __init__ loads models and tokenizers, seconds per rank, and loss.py needs only torch."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    loss_spec = importlib.util.spec_from_file_location(
        "open_clip_loss_only", Path(spec.origin).with_name("loss.py"))
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


def child_main(argv: list[str]) -> None:
    """One rank: ``mode`` "time" (warm-up at size, then ``reps`` timed steps) or
    "memory" (the peak RSS that one step adds, after a small warm-up)."""
    mode, impl = argv[0], argv[1]
    n, d, world, rank, port, reps = map(int, argv[2:8])
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    store = torch.distributed.TCPStore("127.0.0.1", port, world, is_master=False,
                                       timeout=datetime.timedelta(seconds=600))
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=1800))
    loss_fn = _loss_fn(impl, rank, world)
    scale = torch.tensor(14.3, requires_grad=True)

    def step(a, b):
        a.grad = b.grad = scale.grad = None
        loss_fn(a, b, scale).backward()

    def features(rows, seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=gen), dim=-1)
        return x.requires_grad_()

    step(features(64, 1), features(64, 2))  # warm up: lazy imports, the group's connections
    a, b = features(n // world, 3 * rank), features(n // world, 3 * rank + 1)
    result = {"rank": rank, "threads": threads}
    if mode == "time":
        step(a, b)  # warm up at this size
        samples = []
        for _ in range(reps):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            step(a, b)
            samples.append(time.perf_counter() - t0)
        result.update(common.quantiles(samples))
    else:
        torch.distributed.barrier()
        base = common.rss_mib()
        common.reset_peak_rss()
        step(a, b)
        peak = common.rss_mib("VmHWM")
        inputs_mib = 2 * a.numel() * a.element_size() / 2**20  # a and b; their grads as much
        result.update(extra_peak_mib=peak - base - inputs_mib, peak_rss_mib=peak,
                      inputs_mib=inputs_mib)
    print(json.dumps(result))
    torch.distributed.destroy_process_group()


# --- parent: groups of ranks, the table ----------------------------------------------

def allocator_label(glibc_default: bool) -> str:
    """How the memory step's allocator was set (the timed steps: glibc's default)."""
    return "glibc default" if glibc_default else f"glibc, mmap threshold fixed at {MMAP_THRESHOLD}"


def run_group(mode: str, impl: str, n: int, d: int, world: int, reps: int,
              glibc_default: bool = False, timeout: float = 3600) -> list[dict] | str:
    """Start ``world`` ranks in ``mode``; their results, or why there are none."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), env.get("PYTHONPATH")]))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mode == "memory" and not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # see the allocator note above
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = torch.distributed.TCPStore("127.0.0.1", 0, world, is_master=True,
                                       wait_for_workers=False)
    procs = [subprocess.Popen([sys.executable, "-m", MODULE, "--child", mode, impl, str(n), str(d),
                               str(world), str(rank), str(store.port), str(reps)],
                              cwd=common.ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ranks = []
    for proc, (out, err) in zip(procs, outs):
        # A rank that printed its figures and then failed to exit cleanly (gloo's
        # threads at interpreter teardown) still measured them.
        lines = [line for line in out.strip().splitlines() if line.startswith("{")]
        if not lines:
            return f"exit {proc.returncode}: {(err.strip().splitlines() or ['no output'])[-1]}"
        ranks.append(json.loads(lines[-1]))
    return ranks


def measure(impl: str, n: int, d: int, world: int, reps: int, glibc_default: bool = False) -> dict:
    """Time, then memory, of ``impl`` on ``world`` ranks at global batch ``n``, each
    in its own group of fresh processes; the largest figures over ranks."""
    timed = run_group("time", impl, n, d, world, reps)
    if isinstance(timed, str):
        return {"error": timed}
    memory = run_group("memory", impl, n, d, world, reps, glibc_default)
    if isinstance(memory, str):
        return {"error": memory}
    return {
        "extra_peak_mib": max(r["extra_peak_mib"] for r in memory),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in memory),
        "inputs_mib": memory[0]["inputs_mib"],
        "median_s": max(r["median_s"] for r in timed),
        "q20_s": max(r["q20_s"] for r in timed),
        "q80_s": max(r["q80_s"] for r in timed),
        "threads_per_rank": timed[0]["threads"],
    }


def run(points: list[tuple[int, int]], d: int, impls: list[str], reps: int, max_logits_gib: float,
        save: bool, sweep: str, glibc_default: bool = False) -> list[dict]:
    """Measure every implementation at every (world, global N) point."""
    env = common.environment()
    header = (f"{'impl':<16}{'W':>3}{'global N':>10}{'local N':>9}{'D':>5}  {'step ms':>10}"
              f"{'[q20, q80]':>22}{'extra MiB/rank':>16}{'peak RSS MiB':>14}")
    print(f"distributed contrastive loss fwd+bwd ({sweep}), fp32, gloo on CPU, {env['device']}, "
          f"torch {env['torch']}, memory step's allocator: {allocator_label(glibc_default)}")
    print(header)
    print("-" * len(header))
    rows = []
    for world, n in points:
        for impl in impls:
            base = {**env, "op": "distributed_contrastive_loss", "sweep": sweep, "impl": impl,
                    "world": world, "n": n, "local_n": n // world, "d": d, "dtype": "float32",
                    "backend": "gloo", "memory_allocator": allocator_label(glibc_default)}
            need = logits_gib(impl, n, world)
            if need > max_logits_gib:
                print(f"{impl:<16}{world:>3}{n:>10}{n // world:>9}{d:>5}  skipped: its logits alone "
                      f"take {need:.1f} GiB per rank", flush=True)
                rows.append({**base, "error": f"skipped: logits {need:.1f} GiB per rank"})
                continue
            result = measure(impl, n, d, world, reps, glibc_default)
            if "error" in result:
                print(f"{impl:<16}{world:>3}{n:>10}{n // world:>9}{d:>5}  error: {result['error']}",
                      flush=True)
                rows.append({**base, "error": result["error"]})
                continue
            row = {**base, "step_median_ms": result["median_s"] * 1e3,
                   "step_q20_ms": result["q20_s"] * 1e3, "step_q80_ms": result["q80_s"] * 1e3,
                   "extra_peak_mib": result["extra_peak_mib"], "peak_rss_mib": result["peak_rss_mib"],
                   "inputs_and_grads_mib": 2 * result["inputs_mib"],
                   "threads_per_rank": result["threads_per_rank"]}
            rows.append(row)
            print(f"{impl:<16}{world:>3}{n:>10}{n // world:>9}{d:>5}  {row['step_median_ms']:>10.1f}"
                  f"{'[%.1f, %.1f]' % (row['step_q20_ms'], row['step_q80_ms']):>22}"
                  f"{row['extra_peak_mib']:>16.1f}{row['peak_rss_mib']:>14.0f}", flush=True)
    if save and rows:
        jsonl, csv_path = common.append_rows("distributed", rows)
        print(f"rows appended to {csv_path} and {jsonl.name}")
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4, help="ranks (processes)")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="global batch sizes")
    parser.add_argument("--d", type=int, default=256, help="feature dimension D")
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--weak", type=int, default=None, metavar="LOCAL_N",
                        help="also a weak-scaling sweep: LOCAL_N pairs per rank, W = 2 .. --world")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--max-logits-gib", type=float, default=0.3,
                        help="skip implementations whose logits pass this per rank")
    parser.add_argument("--glibc-default", action="store_true",
                        help="keep glibc's dynamic mmap threshold (see the allocator note above)")
    parser.add_argument("--quick", action="store_true", help="one small size, for a smoke test")
    parser.add_argument("--no-save", action="store_true", help="print only, append no rows")
    args = parser.parse_args(argv)
    ns = args.n or ([1024] if args.quick else [2048, 4096, 8192, 16384])
    d = 64 if args.quick and args.d == 256 else args.d
    for n in ns:
        if n % args.world:
            parser.error(f"--n {n} is not a multiple of --world {args.world}")
    missing = [i for i in args.impl if i.startswith("open_clip")]
    if missing and importlib.util.find_spec("open_clip") is None:
        print(f"open_clip is not installed: skipping {missing}")
        args.impl = [i for i in args.impl if not i.startswith("open_clip")]
    run([(args.world, n) for n in ns], d, args.impl, args.reps, args.max_logits_gib,
        not args.no_save, "strong: global N grows, W fixed", args.glibc_default)
    if args.weak:
        run([(w, w * args.weak) for w in range(2, args.world + 1)], d, args.impl, args.reps,
            args.max_logits_gib, not args.no_save, f"weak: {args.weak} pairs per rank",
            args.glibc_default)


if __name__ == "__main__":
    main()
