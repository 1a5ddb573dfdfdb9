"""The measurement engine the per-op benchmark scripts share.

A benchmark script (bench_contrastive.py, ...) says *what* to run: the
implementations, the cases (N, M, D, dtype) and, for one implementation and
one case, a :class:`Workload` (forward, backward, inputs). This module says
*how*, the same way for every op:

Parent side (:func:`run_op_suite`, :func:`run_child_spec`): child processes
(``python -m <script> --child <spec>``) run the implementations' cases in
order and print one result line per case as it finishes; the parent streams
them, so a table prints as the run goes. CPU: a child per implementation, so
that each peak RSS, compile cache and crash is its own. GPU: one child runs
every implementation in turn (peak memory is exact per case there, and a
process start costs seconds the GPU run does not have); after a CUDA error
that leaves the context unusable, a fresh child takes the implementations
not yet started. A child that dies or runs out of time loses only the cases
it had not finished.

Child side (:func:`child_main`), per case:

1. build the workload (inputs on the device) and run one forward + backward
   (warm-up: compiles, autotunes, first-touch of the allocator); check the
   value against a reference when the workload provides one;
2. peak memory of one forward + backward: GPU ``max_memory_allocated``
   (reset just before); CPU peak RSS (``VmHWM``, reset through
   /proc/self/clear_refs after glibc's malloc_trim gave cached heap back);
   reported as ``peak`` = the step's growth + the inputs it reads (the
   memory a training step needs for the loss: inputs, gradients, workspace)
   and ``extra`` = peak - inputs - gradients (the loss's own workspace);
3. timing: forward and backward of the same iterations, split by CUDA
   events (GPU, L2 flushed before each iteration, as triton.testing.do_bench
   does) or perf_counter (CPU); median and 20/80% quantiles of forward,
   backward and their sum per iteration. do_bench itself is not used because
   it times one callable: splitting one iteration gives all three figures
   for the price of one run (the GPU suite must fit 8 minutes).

A child stops early when its deadline would pass: before each case it
predicts the case's time from the last one (the cost scales as N*M*D) and
reports the rest as skipped.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from benchmarks import common

RESULT_TAG = "@@bench-result "
MIB = 2**20


@dataclass(frozen=True)
class Case:
    """One problem size: features (N, D) and (M, D) of ``dtype`` (a torch dtype name)."""

    n: int
    m: int
    d: int
    dtype: str

    def work(self) -> float:
        return float(self.n) * self.m * self.d

    def label(self) -> str:
        return f"N={self.n}" + (f" M={self.m}" if self.m != self.n else "") + f" D={self.d} {self.dtype}"


@dataclass
class Workload:
    """What a benchmark script hands the engine for one implementation and one case.

    forward() -> output; backward(output) runs its backward; zero_grad() drops the
    gradients (called before every forward). ``inputs_bytes``: the tensors the
    step reads (features...), ``grads_bytes``: the gradients it writes. ``error``:
    optional, the relative error of an output against a reference (a float).
    """

    forward: Callable[[], Any]
    backward: Callable[[Any], None]
    zero_grad: Callable[[], None]
    inputs_bytes: int
    grads_bytes: int
    error: Callable[[Any], float] | None = None
    note: str = ""


@dataclass
class Spec:
    """What one child process runs: implementation ``impl`` over a list of cases, then
    each of ``then`` over the same cases (GPU: one process start for all of them)."""

    impl: str
    cases: list[Case]
    device: str
    reps: int
    max_seconds: float          # timing budget of one case (at least 2 samples)
    deadline: float | None      # wall clock (time.time()) after which no case starts
    timing: bool = True         # False: memory (and one step's time) only
    warmup_n: int | None = None  # warm up on this N (then no full-size warm-up); None: full size
    budget_mib: float | None = None  # fail fast past this much memory (set after the warm-up)
    check: bool = True          # compare the output with the workload's reference
    then: list[str] = dataclasses.field(default_factory=list)

    def impls(self) -> list[str]:
        return [self.impl, *self.then]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        raw = json.loads(text)
        raw["cases"] = [Case(**c) for c in raw["cases"]]
        return cls(**raw)


# --- child side ---------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Memory:
    """Peak memory of what runs between start() and stop(), in bytes beyond the start."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            common.malloc_trim()
            self.base = common.rss_mib() * MIB
            common.reset_peak_rss()

    def stop(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return common.rss_mib("VmHWM") * MIB - self.base


def _time_iterations(work: Workload, device: str, reps: int, max_seconds: float) -> dict:
    """Forward, backward and total seconds of up to ``reps`` iterations (at least 2,
    fewer than reps when they would pass ``max_seconds``)."""
    fwd, bwd = [], []
    cuda = device == "cuda"
    if cuda:
        # Flushing L2 between iterations, as triton.testing.do_bench does.
        flush = torch.empty(256 * MIB // 4, dtype=torch.int32, device="cuda")
    start = time.perf_counter()
    while len(fwd) < max(reps, 2) and (len(fwd) < 2 or time.perf_counter() - start < max_seconds):
        work.zero_grad()
        if cuda:
            flush.zero_()
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            events[0].record()
            out = work.forward()
            events[1].record()
            work.backward(out)
            events[2].record()
            torch.cuda.synchronize()
            fwd.append(events[0].elapsed_time(events[1]) / 1e3)
            bwd.append(events[1].elapsed_time(events[2]) / 1e3)
        else:
            t0 = time.perf_counter()
            out = work.forward()
            t1 = time.perf_counter()
            work.backward(out)
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        del out
    total = [f + b for f, b in zip(fwd, bwd)]
    return {"fwd": common.quantiles(fwd), "bwd": common.quantiles(bwd), "total": common.quantiles(total)}


def guard_memory(device: str, budget_mib: float | None) -> None:
    """Make allocations past about ``budget_mib`` (beyond what is held now) fail at once,
    instead of running a case that cannot fit (or swapping a shared machine).
    CPU: RLIMIT_AS at the current address space + the budget + slack (address
    space runs ahead of resident memory); GPU: the caching allocator's memory fraction.
    The fit itself is judged on the measured peak, not on this guard."""
    if not budget_mib:
        return
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        limit = torch.cuda.memory_reserved() + budget_mib * MIB * 1.25 + 512 * MIB
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total))
        return
    import resource

    vm = common.rss_mib("VmSize") * MIB
    limit = int(vm + budget_mib * MIB * 1.25 + 512 * MIB)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return "out of memory" in text or "can't allocate memory" in text or "Cannot allocate memory" in text


def measure_case(prepare: Callable[[str, Case, str], Workload], spec: Spec, case: Case,
                 impl: str | None = None) -> dict:
    """Build, warm up, and measure one case of ``impl`` (default spec.impl; see the module docstring)."""
    device = spec.device
    impl = impl or spec.impl
    result: dict = {"impl": impl, **dataclasses.asdict(case)}
    started = time.perf_counter()
    work = None
    try:
        if spec.warmup_n:  # warm up small (compiles, threads), then only the measured step runs big
            small = dataclasses.replace(case, n=min(spec.warmup_n, case.n), m=min(spec.warmup_n, case.m))
            warm = prepare(impl, small, device)
            warm.zero_grad()
            warm.backward(warm.forward())
            del warm
            gc.collect()
            guard_memory(device, spec.budget_mib)
            work = prepare(impl, case, device)
            result["note"] = work.note
        else:
            guard_memory(device, spec.budget_mib)
            work = prepare(impl, case, device)
            result["note"] = work.note
            work.zero_grad()
            out = work.forward()
            if work.error is not None and spec.check:
                result["rel_err"] = float(work.error(out))
            work.backward(out)
            del out
        _sync(device)
        result["warmup_s"] = time.perf_counter() - started

        work.zero_grad()
        memory = _Memory(device)
        memory.start()
        t0 = time.perf_counter()
        out = work.forward()
        work.backward(out)
        del out
        _sync(device)
        step_s = time.perf_counter() - t0
        grown = memory.stop()
        result["step_s"] = step_s
        result["peak_mib"] = (grown + work.inputs_bytes) / MIB
        result["extra_mib"] = (grown - work.grads_bytes) / MIB
        result["inputs_mib"] = work.inputs_bytes / MIB
        if spec.timing:
            result.update(_time_iterations(work, device, spec.reps, spec.max_seconds))
        result["status"] = "ok"
    except Exception as error:  # reported as the case's result; the next case still runs
        result["status"] = "oom" if _is_oom(error) else "error"
        result["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
    finally:
        del work
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - started
    return result


def emit(result: dict) -> None:
    """Print one result line for the parent."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def exit_with_parent() -> None:
    """End this child when its parent goes (a parent stopped at a timeout must not leave
    children running: they lead sessions of their own, out of reach of its process group)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def child_main(prepare: Callable[[str, Case, str], Workload], spec_json: str) -> None:
    """Run a child's cases in order, printing each result as it is done. The
    implementation FLOOR (the matmul floor) is the same for every op. Each implementation
    gets an equal share of the time left to the deadline."""
    exit_with_parent()
    spec = Spec.from_json(spec_json)
    impls = spec.impls()
    for i, impl in enumerate(impls):
        run_cases = (lambda _, case, device: matmul_workload(case, device)) if impl == FLOOR else prepare
        deadline = share_deadline(spec.deadline, len(impls) - i)
        emit({"impl": impl, "event": "start"})  # so that a parent knows what a crash interrupted
        last: dict | None = None
        for case in spec.cases:
            if deadline is not None and time.time() + _predicted_seconds(spec, last, case) > deadline:
                emit({"impl": impl, **dataclasses.asdict(case), "status": "skipped", "error": "time budget"})
                continue
            result = measure_case(run_cases, spec, case, impl)
            if result["status"] == "ok":
                last = result
            emit(result)
            if _sticky_cuda_error(result):  # the context is gone: a fresh process takes over
                sys.stdout.flush()
                os._exit(STICKY_EXIT)


STICKY_EXIT = 17


def _sticky_cuda_error(result: dict) -> bool:
    """A CUDA error after which this process's context cannot run anything more."""
    text = str(result.get("error", "")).lower()
    return result["status"] == "error" and any(
        sign in text for sign in ("illegal memory access", "unspecified launch failure", "device-side assert",
                                  "misaligned address", "illegal instruction"))


def _predicted_seconds(spec: Spec, last: dict | None, case: Case) -> float:
    """Time of ``case`` from the step time of the last one measured (cost ~ N*M*D):
    warm-up and memory steps, then the timed iterations (as _time_iterations stops).
    The first case has no prediction (its warm-up may compile for minutes)."""
    if last is None:
        return 0.0
    step = last["step_s"] * case.work() / (float(last["n"]) * last["m"] * last["d"])
    timed = max(2.0, min(spec.reps, spec.max_seconds / step)) if step > 0 and spec.timing else 0.0
    return step * (2.0 + timed)


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    common.run_id()  # children stamp their rows with the parent's run id
    env[common.RUN_ID_ENV] = os.environ[common.RUN_ID_ENV]
    return env


def stream_child(args: list[str], on_result: Callable[[dict], None],
                 timeout: float | None = None) -> tuple[list[dict], str | None]:
    """Run ``python ARGS`` (a child of this harness) and call ``on_result`` for each result
    line as it arrives; returns (results, why it ended early or None)."""
    results: list[dict] = []
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen([sys.executable, *args], cwd=common.ROOT, env=child_env(),
                                stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        started = time.time()
        timed_out = False
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        while True:
            wait = None if timeout is None else timeout - (time.time() - started)
            if wait is not None and wait <= 0:
                timed_out = True
                break
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                continue
            if line is None:  # end of the child's output
                break
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
                results.append(result)
                on_result(result)
        if timed_out:
            _kill(proc)
        proc.wait()
        stderr.seek(0)
        tail = [line for line in stderr.read().strip().splitlines() if line.strip()]
    if timed_out:
        why = f"timed out after {timeout:.0f} s"
    elif proc.returncode and proc.returncode < 0:
        why = f"child killed by signal {-proc.returncode} (out of memory?)"
    elif proc.returncode:
        why = tail[-1][:300] if tail else f"child exited with status {proc.returncode}"
    else:
        why = None
    return results, why


def run_child_spec(module: str, spec: Spec, on_result: Callable[[dict], None],
                   timeout: float | None = None) -> list[dict]:
    """Run ``python -m module --child SPEC``; call ``on_result`` for each result as it
    arrives. When the child ends early, implementations it had not started get a fresh
    child; cases it never reported (crash, timeout) come back as errors."""
    started = time.time()
    results: list[dict] = []
    pending = spec.impls()
    why_by_impl: dict[str, str | None] = {}
    begun: list[str] = []

    def on_line(line: dict) -> None:
        if line.get("event") == "start":
            begun.append(line["impl"])
        else:
            results.append(line)
            on_result(line)

    while pending:
        child = dataclasses.replace(spec, impl=pending[0], then=pending[1:])
        left = None if timeout is None else timeout - (time.time() - started)
        begun.clear()
        _, why = stream_child(["-m", module, "--child", child.to_json()], on_line, left)
        why_by_impl.update({impl: why for impl in pending})
        if why is None or not begun or (left is not None and time.time() - started >= timeout):
            break
        # the child died (e.g. a CUDA error) while running begun[-1]: the implementations
        # after it start again in a fresh process
        pending = pending[pending.index(begun[-1]) + 1:]
    done = {(r["impl"], r["n"], r["m"], r["d"], r["dtype"]) for r in results}
    for impl in spec.impls():
        for case in spec.cases:
            if (impl, case.n, case.m, case.d, case.dtype) not in done:
                result = {"impl": impl, **dataclasses.asdict(case), "status": "error",
                          "error": why_by_impl.get(impl) or "the child reported nothing"}
                results.append(result)
                on_result(result)
    return results


def _pump(stream, lines: "queue.Queue") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _kill(proc: subprocess.Popen) -> None:
    """End a child we started, and its own children (it leads its own session)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def share_deadline(deadline: float | None, parts_left: int) -> float | None:
    """The deadline of the next of ``parts_left`` equal shares of the time left."""
    if deadline is None:
        return None
    now = time.time()
    return now + max(0.0, deadline - now) / max(parts_left, 1)


# --- printing -----------------------------------------------------------------

class Table:
    """A fixed-width text table printed row by row (so long runs show progress)."""

    def __init__(self, columns: list[tuple[str, int, str]]):
        # (key, width, format) ; format "" means str
        self.columns = columns

    def header(self) -> str:
        head = "".join(f"{key:>{width}}" if i else f"{key:<{width}}"
                       for i, (key, width, _) in enumerate(self.columns))
        return head + "\n" + "-" * len(head)

    def row(self, values: dict) -> str:
        cells = []
        for i, (key, width, fmt) in enumerate(self.columns):
            value = values.get(key)
            if value is None or (isinstance(value, float) and value != value):
                text = ""
            elif fmt:
                text = format(value, fmt)
            else:
                text = str(value)
            cells.append(f"{text:<{width}}" if i == 0 else f"{text:>{width}}")
        return "".join(cells)


def elapsed(start: float) -> str:
    seconds = int(time.time() - start)
    return f"{seconds // 60:d}m{seconds % 60:02d}s"


# --- the suite runner shared by the per-op scripts -------------------------------

@dataclass
class SuiteOptions:
    """What the entry point (python -m benchmarks) hands every suite's ``run_suite``."""

    device: str
    quick: bool = False
    save: bool = True
    deadline: float | None = None         # wall clock (time.time()) by which to finish
    memory_budget_gib: float | None = None
    impls: list[str] | None = None        # restrict the implementations
    reps: int | None = None


FLOOR = "matmul floor"     # torch.mm at the case's shape, times the op's GEMM count
PEAK = "matmul peak"       # torch.mm on a large square: the device's matrix-multiply rate
PEAK_SIZE = {"cpu": 2048, "cuda": 8192}


def case_inputs(case: Case, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """The features of a case, the same for every implementation: a (N, D) and
    b (M, D) drawn from N(0, 1) in the case's dtype, and the generator (seeded
    0) for any further inputs."""
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(case.n, case.d, device=device, dtype=dtype, generator=gen)
    b = torch.randn(case.m, case.d, device=device, dtype=dtype, generator=gen)
    return a, b, gen


def matmul_workload(case: Case, device: str) -> Workload:
    """One N x D by D x M product in the case's dtype (forward only)."""
    dtype = getattr(torch, case.dtype)
    a, b, _ = case_inputs(case, device)
    out = torch.empty(case.n, case.m, device=device, dtype=dtype)
    return Workload(forward=lambda: torch.mm(a, b.T, out=out), backward=lambda _: None,
                    zero_grad=lambda: None, inputs_bytes=0, grads_bytes=0)


def default_reps(device: str) -> tuple[int, float]:
    """(timed iterations, seconds cap per case): GPU runs are short, CPU runs long."""
    return (25, 0.4) if device == "cuda" else (3, 30.0)


def secondary_cases(device: str, quick: bool) -> list[Case]:
    """The sizes of the suites beside the contrastive loss (logsumexp, similarity,
    siglip): fewer than its, since it carries the targets."""
    if quick:
        return [Case(1024, 1024, 64, "float32")]
    if device == "cuda":
        return [Case(n, n, 768, dtype) for dtype in ("bfloat16", "float32") for n in (8192, 32768)]
    return [Case(n, n, 512, "float32") for n in (2048, 4096)]


def without_compile_when_quick(options: SuiteOptions, impls: list[str]) -> SuiteOptions:
    """CI's quick run times torch.compile in the contrastive suite only: the
    other suites leave out their compile(...) implementations unless asked for."""
    if not options.quick or options.impls is not None:
        return options
    return dataclasses.replace(options, impls=[n for n in impls if not n.startswith("compile(")])


def run_op_suite(*, module: str, op: str, title: str, cases: list[Case], impls: list[str],
                 notes: dict[str, str], options: SuiteOptions, baseline: str = "naive",
                 kind: Callable[[str], str] = lambda name: "mmkernels",
                 version: Callable[[str], str | None] = lambda name: None, floor: bool = True) -> list[dict]:
    """Measure ``impls`` on ``cases`` (the matmul floor first; then on CPU a child per
    implementation, on GPU one child for all), print a row per result as it arrives, and
    append the rows to results/<op>.csv."""
    started = time.time()
    device = options.device
    env = common.environment(device)
    reps, max_seconds = default_reps(device)
    reps = options.reps or reps
    gemms = common.GEMMS[op]["fwd"] + common.GEMMS[op]["bwd"]
    dtypes = sorted({c.dtype for c in cases})
    size = 512 if options.quick else PEAK_SIZE[device]
    peak_cases = [Case(size, size, size, t) for t in dtypes]
    floor_s: dict[tuple, float] = {}
    peak_rate: dict[str, float] = {}
    baseline_s: dict[tuple, float] = {}
    rows: list[dict] = []
    key = lambda r: (r["n"], r["m"], r["d"], r["dtype"])  # noqa: E731

    def keep(row: dict) -> None:  # saved at once: a run stopped midway keeps what it measured
        rows.append(row)
        if options.save:
            common.append_rows(op, [row])

    table = Table([("impl", 16, ""), ("N", 7, "d"), ("D", 6, "d"), ("dtype", 10, ""),
                   ("fwd ms", 10, ".1f"), ("bwd ms", 10, ".1f"), ("total ms", 10, ".1f"),
                   ("[q20, q80]", 20, ""), ("TFLOP/s", 9, ".3f"), ("% peak", 7, ".0f"),
                   ("x floor", 8, ".2f"), (f"vs {baseline}", max(9, len(baseline) + 5), ".2f"), ("peak MiB", 10, ".0f"),
                   ("extra MiB", 10, ".0f"), ("  note", 0, "")])
    print(f"\n== {title}: {len(cases)} sizes x {len(impls)} implementations on {env['device']}, "
          f"torch {env['torch']} ==", flush=True)
    for name, why in notes.items():
        print(f"   (left out: {name}: {why})")
    print(table.header(), flush=True)

    def on_floor(result: dict) -> None:
        if result.get("status") != "ok":
            print(table.row({"impl": result["impl"], "N": result["n"], "D": result["d"],
                             "dtype": result["dtype"], "  note": "  " + result.get("error", "")}), flush=True)
            return
        mm = result["total"]["median_s"]
        rate = 2.0 * result["n"] * result["m"] * result["d"] / mm
        peak_rate[result["dtype"]] = max(peak_rate.get(result["dtype"], 0.0), rate)
        is_peak = result["impl"] == PEAK
        if not is_peak:
            floor_s[key(result)] = gemms * mm
        row = {**env, "suite": op, "impl": result["impl"], "impl_kind": "reference",
               "n": result["n"], "m": result["m"], "d": result["d"], "dtype": result["dtype"],
               "status": "ok", "total_median_ms": (mm if is_peak else gemms * mm) * 1e3,
               "tflops": rate / 1e12}
        keep(row)
        print(table.row({"impl": row["impl"], "N": row["n"], "D": row["d"], "dtype": row["dtype"],
                         "total ms": row["total_median_ms"], "TFLOP/s": row["tflops"],
                         "x floor": None if is_peak else 1.0}), flush=True)

    floor_spec = Spec(FLOOR, list(cases) + peak_cases, device, reps, max_seconds,
                      share_deadline(options.deadline, len(impls) + 1))
    if floor:
        print(f"   [{elapsed(started)}] matmul floor ...", flush=True)
    peak_keys = {(c.n, c.m, c.d, c.dtype) for c in peak_cases}

    def floor_or_peak(result: dict) -> None:
        if key(result) in peak_keys:  # a copy: the child's own result keeps its name
            result = {**result, "impl": PEAK}
        on_floor(result)

    if floor:
        run_child_spec(module, floor_spec, floor_or_peak)

    def on_result(result: dict) -> None:
        impl = result["impl"]
        row = {**env, "suite": op, "impl": impl, "impl_kind": kind(impl), "impl_version": version(impl),
               "n": result["n"], "m": result["m"], "d": result["d"], "dtype": result["dtype"],
               "status": result["status"], "error": result.get("error"), "note": result.get("note") or None}
        shown = {"impl": impl, "N": row["n"], "D": row["d"], "dtype": row["dtype"]}
        if result["status"] == "ok" and "total" in result:
            total = result["total"]["median_s"]
            flops = common.op_flops(op, row["n"], row["m"], row["d"])
            for part in ("fwd", "bwd", "total"):
                row[f"{part}_median_ms"] = result[part]["median_s"] * 1e3
                row[f"{part}_q20_ms"] = result[part]["q20_s"] * 1e3
                row[f"{part}_q80_ms"] = result[part]["q80_s"] * 1e3
            row["samples"] = result["total"]["samples"]
            row["tflops"] = flops / total / 1e12
            peak = peak_rate.get(row["dtype"])
            row["mm_peak_tflops"] = peak / 1e12 if peak else None
            row["pct_of_mm_peak"] = 100.0 * flops / total / peak if peak else None
            floor = floor_s.get(key(row))
            row["matmul_floor_ms"] = floor * 1e3 if floor else None
            row["x_floor"] = total / floor if floor else None
            if impl == baseline:
                baseline_s[key(row)] = total
            base = baseline_s.get(key(row))
            row[f"speedup_vs_{baseline}"] = base / total if base else None
            row["peak_mib"], row["extra_mib"] = result["peak_mib"], result["extra_mib"]
            row["inputs_mib"], row["rel_err"] = result["inputs_mib"], result.get("rel_err")
            shown.update({"fwd ms": row["fwd_median_ms"], "bwd ms": row["bwd_median_ms"],
                          "total ms": row["total_median_ms"],
                          "[q20, q80]": f"[{row['total_q20_ms']:.1f}, {row['total_q80_ms']:.1f}]",
                          "TFLOP/s": row["tflops"], "% peak": row["pct_of_mm_peak"],
                          "x floor": row["x_floor"], f"vs {baseline}": row[f"speedup_vs_{baseline}"],
                          "peak MiB": row["peak_mib"], "extra MiB": row["extra_mib"],
                          "  note": "  " + row["note"] if row["note"] else ""})
        else:
            shown["  note"] = f"  {result['status']}: {result.get('error', '')}"
        keep(row)
        print(table.row(shown), flush=True)

    if device == "cuda" and impls:
        # One process for every implementation: process and CUDA start-up are seconds each,
        # and the GPU run has minutes (after a CUDA error a fresh process takes the rest).
        seen: set[str] = set()

        def with_progress(result: dict) -> None:
            if result["impl"] not in seen:
                seen.add(result["impl"])
                print(f"   [{elapsed(started)}] {result['impl']} ({len(seen)}/{len(impls)})", flush=True)
            on_result(result)

        spec = Spec(impls[0], list(cases), device, reps, max_seconds, options.deadline, then=impls[1:])
        timeout = None if spec.deadline is None else spec.deadline - time.time() + 60
        run_child_spec(module, spec, with_progress, timeout=timeout)
    else:  # CPU: a process per implementation, so that each peak RSS is its own
        for i, impl in enumerate(impls):
            print(f"   [{elapsed(started)}] {impl} ({i + 1}/{len(impls)}) ...", flush=True)
            spec = Spec(impl, list(cases), device, reps, max_seconds,
                        share_deadline(options.deadline, len(impls) - i))
            timeout = None if spec.deadline is None else spec.deadline - time.time() + 60
            run_child_spec(module, spec, on_result, timeout=timeout)
    print(f"   [{elapsed(started)}] done" + (f"; rows appended to {common.results_dir() / op}.csv and .jsonl"
                                            if options.save and rows else ""), flush=True)
    return rows


def script_main(doc: str, prepare: Callable[[str, Case, str], Workload],
                default_cases: Callable[[str, bool], list[Case]],
                run: Callable[[list[Case], SuiteOptions], list[dict]], argv: list[str] | None = None) -> None:
    """The command line every per-op script shares (and its ``--child`` mode)."""
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(prepare, argv[1])
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", help="batch sizes N (default: the suite's)")
    parser.add_argument("--d", type=int, nargs="+", help="feature dimensions D")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", nargs="+", help="implementations (default: every one available)")
    parser.add_argument("--reps", type=int, help="timed iterations per case")
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--no-save", action="store_true", help="print only, append no rows")
    args = parser.parse_args(argv)
    cases = default_cases(args.device, args.quick)
    cases = [Case(n, n, d, t) for t in (args.dtype or sorted({c.dtype for c in cases}))
             for d in (args.d or sorted({c.d for c in cases}))
             for n in (args.n or sorted({c.n for c in cases}))]
    run(cases, SuiteOptions(device=args.device, quick=args.quick, save=not args.no_save,
                            impls=args.impl, reps=args.reps))
