"""Benchmark of siglip_loss: time, TFLOP/s and peak memory per implementation.

    python -m benchmarks.bench_siglip [--n 4096 8192 16384] [--d 512] [--dtype float32]
                                      [--impl naive torch open_clip ...] [--quick]

Each (implementation, N) runs in a fresh subprocess, so its peak memory is its
own (CPU: peak RSS beyond the inputs and their gradients; GPU:
max_memory_allocated beyond them). Implementations: every mmkernels backend
that runs here ("naive" materializes the N x N logits), and open_clip's
``SigLipLoss`` when open_clip is installed. The same run measures the
matrix-multiply floor: one N x N x D torch.mm, times four, the GEMM-equivalents
of forward + backward (SigLIP's tiles cost the same matrix products as the
contrastive primitive's: benchmarks.common.contrastive_flops). Memory flat in
N for the tiled backends is the point: the "extra MiB" column.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks import common

MODULE = "benchmarks.bench_siglip"
FLOOR = "matmul floor"
OPEN_CLIP = "open_clip"
# SigLIP's initial values (Zhai et al., 2023): logit_scale = 10, logit_bias = -10.
SCALE, BIAS = 10.0, -10.0


def implementations(device: str) -> list[str]:
    """naive first (the baseline), every other mmkernels backend here, then open_clip."""
    import importlib.util

    import mmkernels

    names = [n for n in mmkernels.available_backends(device) if not (n == "triton" and device == "cpu")]
    peers = [OPEN_CLIP] if importlib.util.find_spec("open_clip") is not None else []
    return ["naive"] + [n for n in names if n != "naive"] + peers


# --- child: one measurement in its own process ---------------------------------

def _loss_fn(impl: str):
    import mmkernels

    if impl == OPEN_CLIP:
        from open_clip.loss import SigLipLoss

        return SigLipLoss()
    return lambda a, b, s, bias: mmkernels.siglip_loss(a, b, s, bias, backend=impl)


def _measure(impl: str, n: int, d: int, dtype: torch.dtype, device: str, reps: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, d, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, d, device=device, dtype=dtype, generator=gen)
    cuda = device == "cuda"
    timer = common.time_cuda if cuda else (lambda f: common.time_cpu(f, reps=reps))

    if impl == FLOOR:
        out = torch.empty(n, n, device=device, dtype=dtype)
        return {"gemm": timer(lambda: torch.mm(a, b.T, out=out))}

    # Features normalized once, outside the timed step, as open_clip's model returns them.
    a = torch.nn.functional.normalize(a, dim=-1).requires_grad_(True)
    b = torch.nn.functional.normalize(b, dim=-1).requires_grad_(True)
    scale = torch.tensor(SCALE, device=device, requires_grad=True)
    bias = torch.tensor(BIAS, device=device, requires_grad=True)
    loss_fn = _loss_fn(impl)

    def forward():
        return loss_fn(a, b, scale, bias)

    def step():
        a.grad = b.grad = scale.grad = bias.grad = None
        forward().backward()

    step()  # warm-up, and the peak-memory run
    grads_bytes = 2 * a.numel() * a.element_size()
    a.grad = b.grad = scale.grad = bias.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base - grads_bytes) / 2**20
    else:
        base = common.rss_mib()
        common.reset_peak_rss()
        step()
        extra = common.rss_mib("VmHWM") - base - grads_bytes / 2**20

    fwd = timer(lambda: forward())
    loss = forward()
    bwd = timer(lambda: loss.backward(retain_graph=True))
    total = timer(step)
    return {"fwd": fwd, "bwd": bwd, "total": total, "extra_peak_mib": extra}


def child_main(argv: list[str]) -> None:
    impl, n, d, dtype, device, reps = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4], int(argv[5])
    print(json.dumps(_measure(impl, n, d, getattr(torch, dtype), device, reps)))


# --- parent: the table ------------------------------------------------------------

def run(ns: list[int], d: int, dtype: str, device: str, impls: list[str] | None, reps: int,
        save: bool = True) -> list[dict]:
    env = common.environment()
    impls = impls or implementations(device)
    rows: list[dict] = []
    header = (f"{'impl':<14}{'N':>7}{'D':>6}  {'fwd ms':>9}{'bwd ms':>10}{'total ms':>10}"
              f"{'[q20, q80]':>20}{'TFLOP/s':>9}{'% mm':>7}{'x floor':>8}{'vs naive':>9}{'extra MiB':>10}")
    print(f"siglip_loss fwd+bwd, scale {SCALE}, bias {BIAS}, {dtype}, {env['device']}, "
          f"torch {env['torch']}")
    print(header)
    print("-" * len(header))
    for n in ns:
        args = [str(n), str(d), dtype, device, str(reps)]
        floor = common.run_child(MODULE, ["--child", FLOOR, *args])
        if "error" in floor:
            print(f"{FLOOR:<14}{n:>7}{d:>6}  error: {floor['error']}")
            continue
        floor_s = 4 * floor["gemm"]["median_s"]
        flops = common.contrastive_flops(n, n, d)
        mm_rate = flops / floor_s
        print(f"{FLOOR:<14}{n:>7}{d:>6}  {'':>9}{'':>10}{floor_s * 1e3:>10.1f}{'':>20}"
              f"{mm_rate / 1e12:>9.3f}{100.0:>7.0f}{1.0:>8.2f}", flush=True)
        naive_s = None
        for impl in impls:
            result = common.run_child(MODULE, ["--child", impl, *args])
            if "error" in result:
                print(f"{impl:<14}{n:>7}{d:>6}  error: {result['error']}", flush=True)
                rows.append({**env, "op": "siglip_loss", "impl": impl, "n": n, "d": d,
                             "dtype": dtype, "error": result["error"]})
                continue
            total = result["total"]
            if impl == "naive":
                naive_s = total["median_s"]
            rate = flops / total["median_s"]
            speedup = naive_s / total["median_s"] if naive_s else float("nan")
            row = {
                **env, "op": "siglip_loss", "impl": impl, "n": n, "d": d, "dtype": dtype,
                "fwd_median_ms": result["fwd"]["median_s"] * 1e3,
                "bwd_median_ms": result["bwd"]["median_s"] * 1e3,
                "total_median_ms": total["median_s"] * 1e3,
                "total_q20_ms": total["q20_s"] * 1e3, "total_q80_ms": total["q80_s"] * 1e3,
                "tflops": rate / 1e12, "pct_of_matmul": 100 * rate / mm_rate,
                "matmul_floor_ms": floor_s * 1e3, "x_floor": total["median_s"] / floor_s,
                "speedup_vs_naive": speedup, "extra_peak_mib": result["extra_peak_mib"],
            }
            rows.append(row)
            print(f"{impl:<14}{n:>7}{d:>6}  {row['fwd_median_ms']:>9.1f}{row['bwd_median_ms']:>10.1f}"
                  f"{row['total_median_ms']:>10.1f}"
                  f"{'[%.1f, %.1f]' % (row['total_q20_ms'], row['total_q80_ms']):>20}"
                  f"{row['tflops']:>9.3f}{row['pct_of_matmul']:>7.0f}{row['x_floor']:>8.2f}"
                  f"{speedup:>9.2f}{row['extra_peak_mib']:>10.0f}", flush=True)
    if save and rows:
        jsonl, csv_path = common.append_rows("siglip", rows)
        print(f"\nrows appended to {csv_path.relative_to(common.ROOT)} and {jsonl.name}")
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=None, help="batch sizes N")
    parser.add_argument("--d", type=int, default=512, help="feature dimension D")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", nargs="+", default=None, help="implementations (default: all here)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per measurement (CPU)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--no-save", action="store_true", help="print only, append no rows")
    args = parser.parse_args(argv)
    default_n = [1024, 2048] if args.quick else [4096, 8192, 16384]
    d = 128 if args.quick and args.d == 512 else args.d
    run(args.n or default_n, d, args.dtype, args.device, args.impl, args.reps, save=not args.no_save)


if __name__ == "__main__":
    main()
