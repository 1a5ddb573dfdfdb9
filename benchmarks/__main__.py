"""The default benchmark suite (the README's main command): ``python -m benchmarks``.

Runs on the hardware present (GPU when there is one, else CPU), prints a
table as it goes and appends rows under benchmarks/results/.
"""

import argparse

import torch

from benchmarks import bench_contrastive
from benchmarks import bench_siglip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes), for CI")
    parser.add_argument("--no-save", action="store_true", help="print only, append no rows")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.quick:
        ns, d = [1024, 2048], 128
    elif cuda:
        ns, d = [8192, 32768, 65536], 768
    else:
        ns, d = [4096, 8192, 16384], 512
    dtype = "bfloat16" if cuda else "float32"
    bench_contrastive.run(ns, d, dtype, "cuda" if cuda else "cpu", None, reps=3, save=not args.no_save)
    print()
    bench_siglip.run(ns, d, dtype, "cuda" if cuda else "cpu", None, reps=3, save=not args.no_save)


if __name__ == "__main__":
    main()
