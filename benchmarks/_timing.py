"""Timing: the timed iterations of a case, and the time budget of a run.

Forward and backward of the same iterations are timed apart, by CUDA events
(GPU, L2 flushed before each iteration, as triton.testing.do_bench does) or
perf_counter (CPU); median and 20/80% quantiles of forward, backward and
their sum per iteration. do_bench itself is not used because it times one
callable: splitting one iteration gives all three figures for the price of
one run (the GPU suite must fit 8 minutes).

A time budget is a wall-clock deadline shared in equal parts
(:func:`share_deadline`); a child predicts each case's time from the last
one (:func:`predicted_seconds`) and skips what would pass its deadline.
"""

from __future__ import annotations

import time

import torch

from benchmarks import common
from benchmarks._memory import MIB
from benchmarks._results import Case, Spec, Workload


def default_reps(device: str) -> tuple[int, float]:
    """(timed iterations, seconds cap per case): GPU runs are short, CPU runs long."""
    return (25, 0.4) if device == "cuda" else (3, 30.0)


def time_iterations(work: Workload, device: str, reps: int, max_seconds: float) -> dict:
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


def predicted_seconds(spec: Spec, last: dict | None, case: Case) -> float:
    """Time of ``case`` from the step time of the last one measured (cost ~ N*M*D):
    warm-up and memory steps, then the timed iterations (as time_iterations stops).
    The first case has no prediction (its warm-up may compile for minutes)."""
    if last is None:
        return 0.0
    step = last["step_s"] * case.work() / (float(last["n"]) * last["m"] * last["d"])
    timed = max(2.0, min(spec.reps, spec.max_seconds / step)) if step > 0 and spec.timing else 0.0
    return step * (2.0 + timed)


def share_deadline(deadline: float | None, parts_left: int) -> float | None:
    """The deadline of the next of ``parts_left`` equal shares of the time left."""
    if deadline is None:
        return None
    now = time.time()
    return now + max(0.0, deadline - now) / max(parts_left, 1)


def timeout_for(deadline: float | None, slack: float) -> float | None:
    """Seconds from now to ``deadline`` plus ``slack`` (None: no deadline)."""
    return None if deadline is None else deadline - time.time() + slack


def elapsed(start: float) -> str:
    seconds = int(time.time() - start)
    return f"{seconds // 60:d}m{seconds % 60:02d}s"
