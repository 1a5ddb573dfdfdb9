"""The suite runner every benchmark script shares.

A benchmark script (bench_contrastive.py, ...) says *what* to run: its
cases, its implementations and, for one implementation and one case, a
:class:`~benchmarks._results.Workload` (forward, backward, inputs). It
defines ``SUITE``, a :class:`Suite`: ``python -m benchmarks`` runs every
script's ``SUITE.run_suite`` and ``python -m benchmarks.bench_<name>`` is
``SUITE.main()``, one command line for all of them (and their child modes).

:class:`OpSuite` runs the suites of one op the same way for every op: the
matmul floor and peak first, then the implementations in child processes
(benchmarks/_subprocess.py, measured as benchmarks/_child.py says). CPU: a
child per implementation, so that each peak RSS, compile cache and crash is
its own. GPU: one child runs every implementation in turn (peak memory is
exact per case there, and a process start costs seconds the GPU run does
not have). A row prints as each result arrives and is appended at once to
results/<op>.csv and .jsonl, so a run stopped midway keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Callable

import torch

from benchmarks import common, implementations
from benchmarks._child import Prepare, child_main
from benchmarks._results import FLOOR, PEAK, Case, OpRows, Spec, SuiteOptions, case_key
from benchmarks._subprocess import run_child_spec
from benchmarks._tables import OpTable
from benchmarks._timing import default_reps, elapsed, share_deadline, timeout_for

PEAK_SIZE = {"cpu": 2048, "cuda": 8192}  # the square the matmul peak is measured on
Impls = Callable[[str, "list[str] | None"], "tuple[list[str], dict[str, str]]"]


def secondary_cases(device: str, quick: bool) -> list[Case]:
    """The sizes of the suites beside the contrastive loss (logsumexp, similarity,
    siglip): fewer than its, since it carries the targets."""
    if quick:
        return [Case(1024, 1024, 64, "float32")]
    if device == "cuda":
        return [Case(n, n, 768, dtype) for dtype in ("bfloat16", "float32") for n in (8192, 32768)]
    return [Case(n, n, 512, "float32") for n in (2048, 4096)] + half_cases_cpu()


def half_cases_cpu() -> list[Case]:
    """The bf16 and fp16 rows of the CPU suites (the sizes of the bf16 targets,
    bench_contrastive.TARGETS), each beside its same-dtype matmul floor."""
    return [Case(8192, 8192, 512, dtype) for dtype in ("bfloat16", "float16")]


def available(names: list[str], wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """``names`` restricted to ``wanted`` (None: all), and a note for each wanted one not there."""
    chosen = [n for n in names if wanted is None or n in wanted]
    return chosen, {n: "not available here" for n in (wanted or []) if n not in names}


class Suite:
    """A benchmark suite: what ``python -m benchmarks`` runs (:meth:`run_suite`, in
    ``order``, given a share of a time budget proportional to ``weight``) and its
    script's command line (:meth:`main`)."""

    def __init__(self, module: str, doc: str | None, order: int, weight: float):
        self.module, self.doc, self.order, self.weight = module, doc, order, weight

    def run_suite(self, options: SuiteOptions) -> list[dict]:
        """The default suite's part: the default sizes on the device."""
        raise NotImplementedError

    def children(self) -> dict[str, Callable[[str], None]]:
        """The script's child modes: ``python -m MODULE FLAG ARG`` runs children()[FLAG](ARG)."""
        return {}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The script's own options, beside --device, --impl, --quick and --no-save."""

    def run_args(self, args: argparse.Namespace, options: SuiteOptions) -> list[dict]:
        """Run what the script's command line asks for."""
        raise NotImplementedError

    def main(self, argv: list[str] | None = None) -> None:
        argv = sys.argv[1:] if argv is None else argv
        if argv and argv[0] in self.children():
            return self.children()[argv[0]](argv[1])
        parser = argparse.ArgumentParser(description=self.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(parser)
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        parser.add_argument("--impl", nargs="+", help="implementations (default: every one available)")
        parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
        parser.add_argument("--no-save", action="store_true", help="print only, append no rows")
        args = parser.parse_args(argv)
        self.run_args(args, SuiteOptions(device=args.device, quick=args.quick, save=not args.no_save,
                                         impls=args.impl, reps=getattr(args, "reps", None)))


class OpSuite(Suite):
    """The suite of one op: ``impls(device, wanted) -> (names, notes on those left out)``
    on ``cases(device, quick)``, each measured on the workload of ``prepare(impl, case,
    device)``; a row per result, compared with the matmul floor and with ``baseline``.

    ``quick_floor=False``: the quick run leaves out the matmul floor (CI: the contrastive
    suite covers it); ``quick_compile=False``: the quick run leaves out the compile(...)
    implementations unless asked for (CI times torch.compile in the contrastive suite
    only). ``report(rows, device)``: lines printed after the table."""

    def __init__(self, module: str, doc: str | None, *, order: int, weight: float, op: str, title: str,
                 prepare: Prepare, impls: Impls, cases: Callable[[str, bool], list[Case]] = secondary_cases,
                 baseline: str = "naive", kind: Callable[[str], str] = implementations.kind,
                 version: Callable[[str], str | None] = implementations.version,
                 quick_floor: bool = True, quick_compile: bool = True,
                 report: Callable[[list[dict], str], list[str]] = lambda rows, device: []):
        super().__init__(module, doc, order, weight)
        self.op, self.title, self.prepare, self.impls, self.cases = op, title, prepare, impls, cases
        self.baseline, self.kind, self.version, self.report = baseline, kind, version, report
        self.quick_floor, self.quick_compile = quick_floor, quick_compile

    def children(self) -> dict[str, Callable[[str], None]]:
        return {"--child": lambda spec: child_main(self.prepare, spec)}

    def run_suite(self, options: SuiteOptions) -> list[dict]:
        if options.quick and options.impls is None and not self.quick_compile:
            names = self.impls(options.device, None)[0]
            options = dataclasses.replace(options, impls=[n for n in names if not n.startswith("compile(")])
        return self.run(self.cases(options.device, options.quick), options)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n", type=int, nargs="+", help="batch sizes N (default: the suite's)")
        parser.add_argument("--d", type=int, nargs="+", help="feature dimensions D")
        parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"])
        parser.add_argument("--reps", type=int, help="timed iterations per case")

    def run_args(self, args: argparse.Namespace, options: SuiteOptions) -> list[dict]:
        cases = self.cases(args.device, args.quick)
        cases = [Case(n, n, d, t) for t in (args.dtype or sorted({c.dtype for c in cases}))
                 for d in (args.d or sorted({c.d for c in cases}))
                 for n in (args.n or sorted({c.n for c in cases}))]
        return self.run(cases, options)

    def run(self, cases: list[Case], options: SuiteOptions) -> list[dict]:
        """Measure the implementations on ``cases``, print a row per result as it arrives,
        and append the rows to results/<op>.csv (and .jsonl)."""
        impls, notes = self.impls(options.device, options.impls)
        run = _OpRun(self, options)
        print(f"\n== {self.title}: {len(cases)} sizes x {len(impls)} implementations on {run.env['device']}, "
              f"torch {run.env['torch']} ==", flush=True)
        if run.env.get("cpu_kernels"):
            print(f"   (C++ CPU kernels, dtype:products/elementwise: {run.env['cpu_kernels']})", flush=True)
        for name, why in notes.items():
            print(f"   (left out: {name}: {why})")
        print(run.table.header(), flush=True)
        if self.quick_floor or not options.quick:
            run.floor(cases, len(impls) + 1)
        run.implementations(impls, cases)
        run.progress("done" + (f"; rows appended to {common.results_dir() / self.op}.csv and .jsonl"
                               if options.save and run.kept else ""))
        for line in self.report(run.kept, options.device):
            print("   " + line, flush=True)
        return run.kept


class _OpRun:
    """One run of an op suite: the children it starts, the rows it keeps, the table it prints."""

    def __init__(self, suite: OpSuite, options: SuiteOptions):
        self.suite, self.options, self.started = suite, options, time.time()
        self.env = common.environment(options.device)
        reps, self.max_seconds = default_reps(options.device)
        self.reps = options.reps or reps
        self.rows = OpRows(suite.op, self.env, suite.baseline, suite.kind, suite.version)
        self.table = OpTable(suite.baseline)
        self.kept: list[dict] = []

    def progress(self, text: str) -> None:
        print(f"   [{elapsed(self.started)}] {text}", flush=True)

    def spec(self, impls: list[str], cases: list[Case], deadline: float | None) -> Spec:
        return Spec(impls[0], list(cases), self.options.device, self.reps, self.max_seconds, deadline,
                    then=impls[1:])

    def keep(self, row: dict, line: str) -> None:
        self.kept.append(row)
        if self.options.save:
            common.append_rows(self.suite.op, [row])
        print(line, flush=True)

    def floor(self, cases: list[Case], parts: int) -> None:
        """The matmul floor of every case and the matmul peak of every dtype, in one
        child given the first of ``parts`` shares of the time left."""
        size = 512 if self.options.quick else PEAK_SIZE[self.options.device]
        peaks = [Case(size, size, size, t) for t in sorted({c.dtype for c in cases})]
        peak_keys = {c.key() for c in peaks}
        spec = self.spec([FLOOR], list(cases) + peaks, share_deadline(self.options.deadline, parts))

        def on_result(result: dict) -> None:
            if case_key(result) in peak_keys:  # a copy: the child's own result keeps its name
                result = {**result, "impl": PEAK}
            if result.get("status") != "ok":
                print(self.table.failed(result, result.get("error", "")), flush=True)
                return
            row = self.rows.reference(result)
            self.keep(row, self.table.reference(row))

        self.progress("matmul floor ...")
        run_child_spec(self.suite.module, spec, on_result)

    def measured(self, result: dict) -> None:
        row = self.rows.measured(result)
        self.keep(row, self.table.measured(row))

    def implementations(self, impls: list[str], cases: list[Case]) -> None:
        if self.options.device == "cuda" and impls:
            # One process for every implementation: process and CUDA start-up are seconds each,
            # and the GPU run has minutes (after a CUDA error a fresh process takes the rest).
            seen: set[str] = set()

            def with_progress(result: dict) -> None:
                if result["impl"] not in seen:
                    seen.add(result["impl"])
                    self.progress(f"{result['impl']} ({len(seen)}/{len(impls)})")
                self.measured(result)

            spec = self.spec(impls, cases, self.options.deadline)
            run_child_spec(self.suite.module, spec, with_progress, timeout=timeout_for(spec.deadline, 60))
            return
        for i, impl in enumerate(impls):  # CPU: a process per implementation, so that each peak RSS is its own
            self.progress(f"{impl} ({i + 1}/{len(impls)}) ...")
            spec = self.spec([impl], cases, share_deadline(self.options.deadline, len(impls) - i))
            run_child_spec(self.suite.module, spec, self.measured, timeout=timeout_for(spec.deadline, 60))
