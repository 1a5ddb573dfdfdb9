"""What a child process runs: each case of its implementations, measured in turn.

Per case (:func:`measure_case`):

1. build the workload (inputs on the device) and run one forward + backward
   (warm-up: compiles, autotunes, first-touch of the allocator); check the
   value against a reference when the workload provides one;
2. peak memory of one forward + backward (benchmarks/_memory.py), reported
   as ``peak`` = the step's growth + the inputs it reads (the memory a
   training step needs for the loss: inputs, gradients, workspace) and
   ``extra`` = peak - inputs - gradients (the loss's own workspace);
3. timing of forward and backward apart (benchmarks/_timing.py).

A child stops early when its deadline would pass: before each case it
predicts the case's time from the last one (the cost scales as N*M*D) and
reports the rest as skipped.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
from typing import Callable

import torch

from benchmarks._memory import MIB, PeakMemory, guard_memory, is_oom
from benchmarks._results import FLOOR, Case, Spec, Workload
from benchmarks._subprocess import STICKY_EXIT, emit, exit_with_parent
from benchmarks._timing import predicted_seconds, share_deadline, time_iterations

Prepare = Callable[[str, Case, str], Workload]  # (impl, case, device) -> the workload


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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_case(prepare: Prepare, spec: Spec, case: Case, impl: str | None = None) -> dict:
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
        memory = PeakMemory(device)
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
            result.update(time_iterations(work, device, spec.reps, spec.max_seconds))
        result["status"] = "ok"
    except Exception as error:  # reported as the case's result; the next case still runs
        result["status"] = "oom" if is_oom(error) else "error"
        result["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
    finally:
        del work
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - started
    return result


def child_main(prepare: Prepare, spec_json: str) -> None:
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
            if deadline is not None and time.time() + predicted_seconds(spec, last, case) > deadline:
                emit({"impl": impl, **dataclasses.asdict(case), "status": "skipped", "error": "time budget"})
                continue
            result = measure_case(run_cases, spec, case, impl)
            if result["status"] == "ok":
                last = result
            emit(result)
            if _sticky_cuda_error(result):  # the context is gone: a fresh process takes over
                sys.stdout.flush()
                os._exit(STICKY_EXIT)


def _sticky_cuda_error(result: dict) -> bool:
    """A CUDA error after which this process's context cannot run anything more."""
    text = str(result.get("error", "")).lower()
    return result["status"] == "error" and any(
        sign in text for sign in ("illegal memory access", "unspecified launch failure", "device-side assert",
                                  "misaligned address", "illegal instruction"))
