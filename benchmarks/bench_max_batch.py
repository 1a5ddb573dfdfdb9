"""Maximum batch: the largest N whose contrastive forward + backward fits a memory budget.

    python -m benchmarks.bench_max_batch [--memory-budget GIB] [--d 512] [--dtype float32]
                                         [--impl naive torch ...] [--trial-seconds 60] [--quick]

For each implementation (those of bench_contrastive), a search over N: double
from a start until a trial does not fit, then bisect between the last N that
fit and the first that did not, to within 5% (and a multiple of a granule).
A trial runs one forward + backward of the loss at N (D and dtype fixed) and
measures its peak memory as bench_contrastive does (inputs + gradients +
workspace: GPU max_memory_allocated, CPU peak RSS); it *fits* when that peak
is at most the budget. Trials past the budget are cut short by a guard
(CPU: RLIMIT_AS; GPU: the allocator's memory fraction) and count as not
fitting.

CPU: each trial in a fresh process (warm-up on a small N first). GPU: one
process per implementation runs the whole search (each trial warms up at its
own N: Triton autotunes per shape).

Time: the loss costs O(N^2 * D), so the tiled implementations, whose memory
grows only as O(N * D), may need far longer per trial than the budget
allows to reach the memory limit. Before each trial the search predicts its
time from the last fitting trial (quadratic in N); when the prediction passes
``--trial-seconds`` it stops and reports the last N that fit as a lower
bound (``limited_by = "time"``), with the share of the budget it used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from benchmarks import bench_contrastive, common, implementations
from benchmarks._child import measure_case
from benchmarks._results import Case, Spec, SuiteOptions
from benchmarks._subprocess import emit, exit_with_parent, run_child_spec, stream_child
from benchmarks._tables import Table
from benchmarks._timing import elapsed, share_deadline, timeout_for
from benchmarks.suite import Suite

MODULE = "benchmarks.bench_max_batch"
TOLERANCE = 0.05


@dataclasses.dataclass
class Settings:
    d: int
    dtype: str
    budget_gib: float
    start_n: int
    granule: int
    trial_seconds: float
    max_n: int
    warmup_n: int = 256
    # One process runs the whole search (GPU; each trial warms up at its own N: Triton
    # autotunes per shape), or a fresh process per trial (CPU: warm-up on a small N).
    in_process: bool = False

    @property
    def steps_per_trial(self) -> int:
        """Full-size forward + backward steps one trial runs."""
        return 2 if self.in_process else 1


def default_settings(device: str, quick: bool, budget_gib: float | None) -> Settings:
    if quick:
        return Settings(d=64, dtype="float32", budget_gib=budget_gib or 1 / 32, start_n=512, granule=128,
                        trial_seconds=20.0, max_n=2048)
    if device == "cuda":
        return Settings(d=768, dtype="bfloat16", budget_gib=budget_gib or 8.0, start_n=16384, granule=1024,
                        trial_seconds=20.0, max_n=1 << 23, in_process=True)
    return Settings(d=512, dtype="float32", budget_gib=budget_gib or 4.0, start_n=4096, granule=256,
                    trial_seconds=60.0, max_n=1 << 20)


def default_impls(device: str, quick: bool) -> tuple[list[str], dict[str, str]]:
    impls, notes = implementations.contrastive_impls(device)
    if quick:  # CI: the baseline and the tiled backends (compile adds seconds per trial process)
        impls = [name for name in impls if implementations.kind(name) == "mmkernels" or name == "naive"]
    elif device == "cuda":  # the GPU run's minutes go to the tiled paths; the materializing peers
        # of naive (open_clip, compile) fit about what naive fits
        impls = [name for name in impls if name not in ("open_clip", "compile(naive)")]
    return impls, notes


# --- the search ------------------------------------------------------------------------

def search(trial, settings: Settings, deadline: float | None, on_trial=lambda r: None) -> dict:
    """Largest fitting N by doubling then bisection; ``trial(n) -> result`` (as measure_case returns)."""
    budget_mib = settings.budget_gib * 1024
    started = time.time()
    fit: dict | None = None      # the largest N that fit so far, with its result
    fail: dict | None = None     # the smallest N that did not fit
    limited_by = None
    trials = 0

    def round_n(n: float) -> int:
        return max(settings.granule, int(n) // settings.granule * settings.granule)

    def too_slow(n: int) -> bool:
        if fit is None:
            return False
        predicted = fit["step_s"] * (n / fit["n"]) ** 2 * settings.steps_per_trial * 1.5  # 1.5: margin
        if predicted > settings.trial_seconds:
            return True
        return deadline is not None and time.time() + predicted > deadline

    while True:
        if fit is not None and fail is not None:  # bisect
            lo, hi = fit["n"], fail["n"]
            candidate = round_n((lo + hi) / 2)
            if hi - lo <= max(settings.granule, TOLERANCE * lo) or candidate <= lo:
                limited_by = "memory"
                break
        elif fail is not None:  # nothing fit yet: halve
            candidate = round_n(fail["n"] / 2)
            if candidate >= fail["n"]:
                limited_by = "memory"
                break
        elif fit is not None:  # double
            if fit["n"] >= settings.max_n:
                limited_by = "max_n"
                break
            candidate = min(fit["n"] * 2, settings.max_n)
        else:
            candidate = settings.start_n
        if too_slow(candidate):
            limited_by = "time"
            break
        result = trial(candidate)
        trials += 1
        result["fits"] = result.get("status") == "ok" and result["peak_mib"] <= budget_mib
        on_trial(result)
        if result["fits"]:
            fit = result
        elif result.get("status") in ("ok", "oom"):
            fail = result
        else:  # neither fits nor runs out of memory: a timeout or a failure, reported as such
            limited_by = "time" if "timed out" in str(result.get("error")) else "error"
            fail = result
            break
    return {
        "max_n": fit["n"] if fit else None, "limited_by": limited_by,
        "first_failing_n": fail["n"] if fail else None,
        "fail_reason": (fail.get("error") or f"peak {fail['peak_mib']:.0f} MiB") if fail else None,
        "peak_mib_at_max": fit["peak_mib"] if fit else None,
        "budget_used_pct": 100 * fit["peak_mib"] / budget_mib if fit else None,
        "step_s_at_max": fit["step_s"] if fit else None,
        "trials": trials, "search_s": time.time() - started,
    }


def _spec(impl: str, n: int, settings: Settings, device: str) -> Spec:
    case = Case(n, n, settings.d, settings.dtype)
    warmup_n = None if settings.in_process else settings.warmup_n
    return Spec(impl, [case], device, reps=1, max_seconds=0.0, deadline=None, timing=False,
                        warmup_n=warmup_n, budget_mib=settings.budget_gib * 1024, check=False)


def _search_child(spec_json: str) -> None:
    """The whole search of one implementation in this process (Settings.in_process)."""
    exit_with_parent()
    raw = json.loads(spec_json)
    settings, impl, device, deadline = Settings(**raw["settings"]), raw["impl"], raw["device"], raw["deadline"]

    def trial(n):
        spec = _spec(impl, n, settings, device)
        return measure_case(bench_contrastive.prepare, spec, spec.cases[0])

    summary = search(trial, settings, deadline, on_trial=lambda r: emit({**r, "kind": "trial"}))
    emit({"impl": impl, "kind": "summary", **summary})


# --- parent ------------------------------------------------------------------------------

def run(options: SuiteOptions, settings: Settings, impls: list[str], notes: dict[str, str]) -> list[dict]:
    device = options.device
    env = common.environment(device)
    started = time.time()
    budget_mib = settings.budget_gib * 1024
    print(f"\n== maximum batch: contrastive_loss fwd+bwd within {budget_mib:.0f} MiB, D={settings.d}, "
          f"{settings.dtype}, on {env['device']} (trials up to {settings.trial_seconds:.0f} s) ==", flush=True)
    for name, why in notes.items():
        print(f"   (left out: {name}: {why})")
    table = Table([("impl", 16, ""), ("max N", 9, ""), ("limited by", 12, ""),
                    ("failed at", 11, ""), ("peak MiB", 10, ".0f"), ("% budget", 9, ".0f"),
                    ("step s", 9, ".2f"), ("trials", 7, "d"), ("  note", 0, "")])
    summaries, trial_rows = [], []
    base = {**env, "suite": "max_batch", "op": "contrastive", "d": settings.d, "dtype": settings.dtype,
            "memory_budget_mib": budget_mib}

    def on_trial(impl: str, result: dict) -> None:
        trial_rows.append({**base, "impl": impl, "n": result["n"], "status": result.get("status"),
                           "fits": result.get("fits"), "peak_mib": result.get("peak_mib"),
                           "extra_mib": result.get("extra_mib"), "step_s": result.get("step_s"),
                           "error": result.get("error")})
        if options.save:  # saved at once: a run stopped midway keeps what it measured
            common.append_rows("max_batch_trials", trial_rows[-1:])
        verdict = "fits" if result.get("fits") else (
            f"over ({result['peak_mib']:.0f} MiB)" if result.get("status") == "ok" else result.get("status"))
        print(f"   .. {impl} N={result['n']}: {verdict}"
              + (f", {result['step_s']:.1f} s" if result.get("step_s") else ""), flush=True)

    print(table.header(), flush=True)
    for i, impl in enumerate(impls):
        deadline = share_deadline(options.deadline, len(impls) - i)
        print(f"   [{elapsed(started)}] {impl} ({i + 1}/{len(impls)}) ...", flush=True)
        if settings.in_process:
            summary = search_in_child(impl, settings, device, deadline, lambda r: on_trial(impl, r))
        else:
            def trial(n, impl=impl):
                spec = _spec(impl, n, settings, device)
                timeout = settings.trial_seconds * 5 + 60
                return run_child_spec(bench_contrastive.SUITE.module, spec, lambda r: None, timeout=timeout)[0]

            summary = search(trial, settings, deadline, on_trial=lambda r, impl=impl: on_trial(impl, r))
        row = {**base, "impl": impl, "impl_kind": implementations.kind(impl),
               "impl_version": implementations.version(impl), **summary}
        summaries.append(row)
        if options.save:
            common.append_rows("max_batch", [row])
        shown = {"impl": impl, "max N": _max_n_text(row), "limited by": row["limited_by"],
                 "failed at": row["first_failing_n"], "peak MiB": row["peak_mib_at_max"],
                 "% budget": row["budget_used_pct"], "step s": row["step_s_at_max"], "trials": row["trials"],
                 "  note": "  " + (row["fail_reason"] or "") if row["limited_by"] == "error" else ""}
        print(table.row(shown), flush=True)
    print(f"   [{elapsed(started)}] done. max N: largest N measured to fit; '>=' when the search "
          f"stopped on time (trials over {settings.trial_seconds:.0f} s), not memory", flush=True)
    if options.save and summaries:
        print(f"   rows appended to {common.results_dir() / 'max_batch'}.csv (trials: max_batch_trials.csv)",
              flush=True)
    return summaries


def _max_n_text(row: dict) -> str:
    if row["max_n"] is None:
        return "none"
    return (">=" if row["limited_by"] in ("time", "max_n") else "") + str(row["max_n"])


def search_in_child(impl: str, settings: Settings, device: str, deadline: float | None,
                    on_trial=lambda r: None) -> dict:
    """:func:`search` for ``impl`` run whole in one child process; returns its summary."""
    payload = json.dumps({"impl": impl, "device": device, "deadline": deadline,
                          "settings": dataclasses.asdict(settings)})
    summary: dict = {}

    def on_result(result):
        if result.get("kind") == "trial":
            on_trial(result)
        elif result.get("kind") == "summary":
            summary.update({k: v for k, v in result.items() if k not in ("impl", "kind")})

    _, why = stream_child(["-m", MODULE, "--search", payload], on_result, timeout_for(deadline, 90))
    if not summary:
        summary = {"max_n": None, "limited_by": "error", "first_failing_n": None,
                   "fail_reason": why or "the search reported nothing",
                   "peak_mib_at_max": None, "budget_used_pct": None, "step_s_at_max": None, "trials": 0}
    return summary


class MaxBatchSuite(Suite):
    def children(self):
        return {"--search": _search_child}

    def run_suite(self, options: SuiteOptions) -> list[dict]:
        settings = default_settings(options.device, options.quick, options.memory_budget_gib)
        impls, notes = default_impls(options.device, options.quick)
        if options.impls:
            impls = [name for name in impls if name in options.impls]
        return run(options, settings, impls, notes)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--memory-budget", type=float, help="GiB (default: CPU 4, GPU 8)")
        parser.add_argument("--d", type=int)
        parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
        parser.add_argument("--trial-seconds", type=float, help="longest trial the search may start")
        parser.add_argument("--start-n", type=int)
        parser.add_argument("--in-process", action="store_true",
                            help="one process per implementation runs the whole search (the GPU default)")

    def run_args(self, args: argparse.Namespace, options: SuiteOptions) -> list[dict]:
        settings = default_settings(args.device, args.quick, args.memory_budget)
        for field, value in (("d", args.d), ("dtype", args.dtype), ("trial_seconds", args.trial_seconds),
                             ("start_n", args.start_n), ("in_process", args.in_process or None)):
            if value is not None:
                setattr(settings, field, value)
        impls, notes = default_impls(args.device, args.quick)
        if args.impl:
            impls, notes = implementations.contrastive_impls(args.device, args.impl)
        return run(dataclasses.replace(options, impls=None), settings, impls, notes)


SUITE = MaxBatchSuite(MODULE, __doc__, order=20, weight=3.0)

if __name__ == "__main__":
    SUITE.main()
