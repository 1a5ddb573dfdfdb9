"""The benchmark suite, the README's main command: ``python -m benchmarks`` (``make bench``).

Runs the default suites on the hardware present (the GPU when there is one,
else the CPU), prints a table per suite as it goes, appends the rows to
CSV and JSONL files under benchmarks/results/ and draws the plots there.

Suites plug in by themselves: every module ``benchmarks/bench_<name>.py``
that defines ``SUITE``, a :class:`benchmarks.suite.Suite`, is one, run in the
order of its ``SUITE.order`` and given a share of ``--time-budget``
proportional to its ``SUITE.weight``. A module without ``SUITE`` is a
standalone script, left alone.

    python -m benchmarks                       # the default suite
    python -m benchmarks --quick               # small sizes, under 2 minutes (CI); rows go to a temp folder
    python -m benchmarks --list                # the suites found
    python -m benchmarks --suites contrastive max_batch --memory-budget 2
    python -m benchmarks --results-dir OUT --time-budget 300
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

import benchmarks
from benchmarks import common
from benchmarks._results import SuiteOptions
from benchmarks._timing import elapsed
from benchmarks.suite import Suite


def discover() -> list[tuple[str, object]]:
    """(name, module) of every suite: benchmarks/bench_<name>.py defining SUITE, in order."""
    found = []
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if not info.name.startswith("bench_"):
            continue
        try:
            module = importlib.import_module(f"benchmarks.{info.name}")
        except Exception as error:  # a broken script must not take the suite down
            print(f"(suite {info.name[6:]}: cannot import: {type(error).__name__}: {error})")
            continue
        if isinstance(getattr(module, "SUITE", None), Suite):
            found.append((info.name[len("bench_"):], module))
    return sorted(found, key=lambda item: (item[1].SUITE.order, item[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes), for CI")
    parser.add_argument("--no-save", action="store_true", help="print only: append no rows, draw no plots")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--suites", nargs="+", help="run only these suites (see --list)")
    parser.add_argument("--impl", nargs="+", help="run only these implementations")
    parser.add_argument("--memory-budget", type=float, metavar="GIB",
                        help="budget of the maximum-batch search (default: CPU 4, GPU 8)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="finish within this time: suites share it, cases that would pass it are skipped")
    parser.add_argument("--results-dir", type=Path,
                        help="append rows and draw plots here (default benchmarks/results/; "
                             "--quick: a temporary folder)")
    parser.add_argument("--reps", type=int, help="timed iterations per case")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    args = parser.parse_args(argv)

    suites = discover()
    if args.list:
        for name, module in suites:
            print(f"{name:<14} {(module.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if args.suites:
        unknown = set(args.suites) - {name for name, _ in suites}
        if unknown:
            parser.error(f"--suites: unknown {sorted(unknown)}; found {[name for name, _ in suites]}")
        suites = [(name, module) for name, module in suites if name in args.suites]

    results_dir = args.results_dir
    if results_dir is None and args.quick and not args.no_save:
        results_dir = Path(tempfile.mkdtemp(prefix="mmkernels-bench-quick-"))
    if results_dir is not None:
        os.environ[common.RESULTS_ENV] = str(results_dir.resolve())
    run_id = common.run_id()
    env = common.environment(args.device)
    started = time.time()
    deadline = started + args.time_budget if args.time_budget else None
    print(f"mmkernels benchmarks{' (quick)' if args.quick else ''}: {env['device']}, torch {env['torch']}, "
          f"triton {env['triton']}, mmkernels {env['mmkernels']} @ {env['git_sha']}, run {run_id}")
    print(f"suites: {', '.join(name for name, _ in suites)}"
          + (f"; time budget {args.time_budget:.0f} s" if deadline else ""), flush=True)

    options = SuiteOptions(device=args.device, quick=args.quick, save=not args.no_save,
                           memory_budget_gib=args.memory_budget, impls=args.impl, reps=args.reps)
    failed = []
    weights = [float(module.SUITE.weight) for _, module in suites]
    for i, (name, module) in enumerate(suites):
        if deadline is not None:
            left = deadline - time.time()
            options.deadline = time.time() + max(0.0, left) * weights[i] / sum(weights[i:])
        try:
            module.SUITE.run_suite(options)
        except Exception:  # report, and run the other suites
            failed.append(name)
            print(f"\n!! suite {name} failed:\n{traceback.format_exc()}", flush=True)

    if options.save:
        folder = common.results_dir()
        try:
            from benchmarks import plot

            pngs = plot.plot_all(folder, run_id=run_id)
            print(f"\nplots: {', '.join(str(p) for p in pngs) or 'none'}")
        except ImportError as error:
            print(f"\nplots skipped ({error}; pip install matplotlib)")
        print(f"results in {folder}")
    print(f"total {elapsed(started)}" + (f"; failed suites: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
