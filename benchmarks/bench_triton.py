"""Per-kernel benchmark of the triton backend (GPU): where the time of fwd + bwd goes.

    python -m benchmarks.bench_triton [--n 16384 65536] [--d 768] [--dtype bfloat16] [--no-save]

For each N (square N x N x D problems, normalize=True), times in one process,
with triton.testing.do_bench (median, 20/80% quantiles):

- ``mm``: one N x N x D torch.mm in the same dtype, the matrix-multiply rate
  every kernel is compared with ("% mm": a kernel's FLOP rate over it);
- ``lse_fwd``: the forward op (1 GEMM-equivalent: 2*N*N*D FLOPs);
- ``lse_bwd``: the backward op (3 GEMM-equivalents), and, within it, one
  block's ``bwd_p`` kernel (S recomputed, P written) and ``bwd_products``
  (P @ B and P.T @ A), to see which half falls short;
- ``similarity_fwd`` / ``similarity_bwd``: normalized_similarity's kernels
  (when N*N fits in memory);
- ``siglip_fwd`` / ``siglip_bwd``: SigLIP's sigmoid-loss ops (1 and 3
  GEMM-equivalents; logit_scale 10, bias -10, positives on the diagonal),
  and within the backward one block's ``siglip_bwd_p`` kernel;

and prints the autotune choice of each kernel. Rows append to
benchmarks/results/triton_kernels.csv (and .jsonl). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import common


def _time_mm(a: torch.Tensor, b: torch.Tensor) -> dict:
    out = torch.empty(a.shape[0], b.shape[0], device=a.device, dtype=a.dtype)
    return common.time_cuda(lambda: torch.mm(a, b.T, out=out))


def _kernel_name(kernel) -> str:
    """The Triton function's name, through an autotuner."""
    return getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))


def first_block(run, p_kernel: str):
    """Replays of the first block of a backward: (its P kernel's launch, the launches
    after it up to the next block's: the products). ``run`` runs the backward once,
    with every launch recorded on its way to the GPU."""
    from mmkernels.triton import _launch

    launches, real = [], _launch.launch

    def record(kernel, grid, *args, **kwargs):
        launches.append((kernel, grid, args, kwargs))
        return real(kernel, grid, *args, **kwargs)

    _launch.launch = record
    try:
        run()
    finally:
        _launch.launch = real
    names = [_kernel_name(kernel) for kernel, *_ in launches]
    first = names.index(p_kernel)
    after = [k for k in range(first + 1, len(names)) if names[k] == p_kernel]
    block = launches[first: after[0] if after else len(launches)]

    def replay(calls):
        return lambda: [real(kernel, grid, *args, **kwargs) for kernel, grid, args, kwargs in calls]

    return replay(block[:1]), replay(block[1:])


def measure(n: int, d: int, dtype: torch.dtype) -> list[dict]:
    from mmkernels.triton import _launch, logsumexp as lse, siglip, similarity  # registers the ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen)
    b = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen)
    scale = torch.tensor(14.3, device="cuda")
    gemm = 2.0 * n * n * d
    results = {}

    results["mm"] = (_time_mm(a, b), gemm)

    results["lse_fwd"] = (common.time_cuda(lambda: lse.triton_lse_fwd(a, b, scale, True)), gemm)
    row, col = lse.triton_lse_fwd(a, b, scale, True)
    g_row = torch.full_like(row, 0.5 / n)
    g_col = torch.full_like(col, 0.5 / n)
    results["lse_bwd"] = (common.time_cuda(
        lambda: lse.triton_lse_bwd(a, b, scale, True, row, col, g_row, g_col)), 3 * gemm)

    # One block of the backward, its two halves apart: the launches of the first
    # block, recorded from a real backward (so their arguments are the op's own).
    rows, cols = _launch.p_block(n, n, a.element_size(), _launch.arch(a.device))
    block = 2.0 * rows * cols * d
    p_kernel, products = first_block(lambda: lse.triton_lse_bwd(a, b, scale, True, row, col, g_row, g_col),
                                     "_lse_bwd_p_kernel")
    results["bwd_p"] = (common.time_cuda(p_kernel), block)
    results["bwd_products"] = (common.time_cuda(products), 2 * block)

    sig_scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    results["siglip_fwd"] = (common.time_cuda(
        lambda: siglip.triton_siglip_fwd(a, b, sig_scale, bias, True, True)), gemm)
    results["siglip_bwd"] = (common.time_cuda(
        lambda: siglip.triton_siglip_bwd(a, b, sig_scale, bias, True, True, g_row)), 3 * gemm)
    siglip_p_kernel, _ = first_block(
        lambda: siglip.triton_siglip_bwd(a, b, sig_scale, bias, True, True, g_row), "_siglip_bwd_p_kernel")
    results["siglip_bwd_p"] = (common.time_cuda(siglip_p_kernel), block)

    if n * n * a.element_size() * 2 < torch.cuda.mem_get_info()[0] // 2:
        results["similarity_fwd"] = (common.time_cuda(
            lambda: similarity.triton_similarity_fwd(a, b, scale)), gemm)
        grad = torch.randn(n, n, device="cuda", dtype=dtype, generator=gen)
        results["similarity_bwd"] = (common.time_cuda(
            lambda: similarity.triton_similarity_bwd(a, b, scale, grad)), 2 * gemm)
        del grad

    mm_rate = results["mm"][1] / results["mm"][0]["median_s"]
    rows_out = []
    for name, (stats, flops) in results.items():
        rate = flops / stats["median_s"]
        rows_out.append({"kernel": name, "n": n, "d": d, "dtype": str(dtype).replace("torch.", ""),
                         "median_ms": stats["median_s"] * 1e3, "q20_ms": stats["q20_s"] * 1e3,
                         "q80_ms": stats["q80_s"] * 1e3, "tflops": rate / 1e12,
                         "pct_of_mm": 100 * rate / mm_rate})
    return rows_out


def autotune_choices() -> list[str]:
    """The config each autotuned kernel settled on, per autotune key."""
    from mmkernels.triton import _launch

    return [f"{tuner.fn.__name__:<24} key {key}: {config}"
            for tuner in _launch.TUNERS for key, config in tuner.cache.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-save", action="store_true", help="print only, append no rows")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        sys.exit("bench_triton needs a CUDA GPU (the interpreter's timings mean nothing)")
    env = common.environment()
    print(f"triton kernels, normalize=True, {args.dtype}, D={args.d}, {env['device']}, "
          f"torch {env['torch']}, triton {env['triton']}")
    print(f"{'kernel':<16}{'N':>7}  {'median ms':>10}{'[q20, q80]':>20}{'TFLOP/s':>9}{'% mm':>7}")
    rows = []
    for n in args.n:
        for row in measure(n, args.d, getattr(torch, args.dtype)):
            rows.append({**env, **row})
            print(f"{row['kernel']:<16}{n:>7}  {row['median_ms']:>10.3f}"
                  f"{'[%.3f, %.3f]' % (row['q20_ms'], row['q80_ms']):>20}"
                  f"{row['tflops']:>9.1f}{row['pct_of_mm']:>7.0f}", flush=True)
    print("\nautotune choices:")
    for line in autotune_choices():
        print("  " + line)
    if rows and not args.no_save:
        jsonl, csv_path = common.append_rows("triton_kernels", rows)
        print(f"\nrows appended to {csv_path} and {jsonl.name}")


if __name__ == "__main__":
    main()
