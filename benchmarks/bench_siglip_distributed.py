"""Per-rank memory and time of SigLipLoss with world_size > 1: mmkernels' ring
against open_clip's exchange, gloo processes on 127.0.0.1 (CPU).

    python -m benchmarks.bench_siglip_distributed [--world 2 4] [--n 2048] [--d 256]
                                                  [--dist-impl bidir]

For each world size W and implementation, W processes each hold n image and n
text features and run forward + backward of ``SigLipLoss(rank, W, dist_impl)``.
Reported per implementation: the largest peak RSS any rank added beyond its
inputs and their gradients ("extra MiB"), and the median time of a step on
rank 0. mmkernels' ring keeps O(n * D) per rank whatever W; open_clip's
autograd keeps every received text block and its n x n logits, so its extra
memory grows with W.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

from benchmarks import common

MODULE = "benchmarks.bench_siglip_distributed"
IMPLS = ("mmkernels", "open_clip")


# --- child: one rank ----------------------------------------------------------------

def child_main(argv: list[str]) -> None:
    import torch.distributed as dist

    impl, world, rank, port, n, d, dist_impl = argv[0], *map(int, argv[1:6]), argv[6]
    timeout = datetime.timedelta(seconds=300)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    if impl == "mmkernels":
        import mmkernels

        loss_fn = mmkernels.SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)
    else:
        from open_clip.loss import SigLipLoss

        loss_fn = SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)
    gen = torch.Generator().manual_seed(rank)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)

    def step():
        a.grad = b.grad = scale.grad = bias.grad = None
        loss_fn(a, b, scale, bias).backward()

    step()  # warm-up
    a.grad = b.grad = scale.grad = bias.grad = None
    dist.barrier()
    base = common.rss_mib()
    common.reset_peak_rss()
    step()
    extra = common.rss_mib("VmHWM") - base - 2 * a.numel() * a.element_size() / 2**20
    dist.barrier()
    timing = common.time_cpu(step, warmup=0, reps=3)
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "extra_peak_mib": extra, "step": timing}))


# --- parent -------------------------------------------------------------------------

def _run_group(impl: str, world: int, n: int, d: int, dist_impl: str) -> list[dict]:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True,
                          timeout=datetime.timedelta(seconds=300), wait_for_workers=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), env.get("PYTHONPATH")]))
    procs = [subprocess.Popen([sys.executable, "-m", MODULE, "--child", impl, str(world), str(rank),
                               str(store.port), str(n), str(d), dist_impl],
                              cwd=common.ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            return [{"error": (err.strip().splitlines() or ["failed"])[-1]}]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def run(worlds: list[int], n: int, d: int, dist_impl: str) -> list[dict]:
    env = common.environment()
    print(f"SigLipLoss fwd+bwd per rank, gloo on {env['device']}, local n={n}, D={d}, "
          f"dist_impl={dist_impl}, 1 thread per rank, torch {env['torch']}")
    header = f"{'impl':<12}{'W':>4}{'global N':>10}{'step ms':>10}{'extra MiB':>11}"
    print(header)
    print("-" * len(header))
    rows = []
    for world in worlds:
        for impl in IMPLS:
            results = _run_group(impl, world, n, d, dist_impl)
            if "error" in results[0]:
                print(f"{impl:<12}{world:>4}{world * n:>10}  error: {results[0]['error']}")
                continue
            extra = max(r["extra_peak_mib"] for r in results)
            step_ms = results[0]["step"]["median_s"] * 1e3
            rows.append({**env, "op": "SigLipLoss", "impl": impl, "world": world, "n": n, "d": d,
                         "dist_impl": dist_impl, "step_median_ms": step_ms, "extra_peak_mib": extra})
            print(f"{impl:<12}{world:>4}{world * n:>10}{step_ms:>10.1f}{extra:>11.0f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="world sizes")
    parser.add_argument("--n", type=int, default=2048, help="rows per rank")
    parser.add_argument("--d", type=int, default=256, help="feature dimension D")
    parser.add_argument("--dist-impl", default="bidir", choices=["bidir", "shift", "reduce", "gather"])
    args = parser.parse_args(argv)
    run(args.world, args.n, args.d, args.dist_impl)


if __name__ == "__main__":
    main()
