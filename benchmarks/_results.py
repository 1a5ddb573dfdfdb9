"""The data model of a benchmark run.

A :class:`Case` is one problem size; a :class:`Workload` is what one
implementation runs on one case (a benchmark script builds it); a
:class:`Spec` is what one child process runs; :class:`SuiteOptions` is what
the entry point hands every suite; :class:`OpRows` turns the results a child
reports into the rows a suite saves, with the figures that compare them
(TFLOP/s, the matmul floor and peak, the speed-up over a baseline).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

from benchmarks import common

FLOOR = "matmul floor"     # torch.mm at the case's shape, times the op's GEMM count
PEAK = "matmul peak"       # torch.mm on a large square: the device's matrix-multiply rate


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

    def key(self) -> tuple:
        return (self.n, self.m, self.d, self.dtype)


def case_key(result: dict) -> tuple:
    """The :meth:`Case.key` of a result or row."""
    return (result["n"], result["m"], result["d"], result["dtype"])


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


class OpRows:
    """The rows of one op suite's run: each result a child reports, stamped with the
    environment, plus what compares it with the run's other rows (the matmul floor
    of its case, the best matmul rate of its dtype, the baseline's time)."""

    def __init__(self, op: str, env: dict, baseline: str, kind: Callable[[str], str],
                 version: Callable[[str], str | None]):
        self.op, self.env, self.baseline, self.kind, self.version = op, env, baseline, kind, version
        self.gemms = common.GEMMS[op]["fwd"] + common.GEMMS[op]["bwd"]
        self.floor_s: dict[tuple, float] = {}
        self.peak_rate: dict[str, float] = {}
        self.baseline_s: dict[tuple, float] = {}

    def reference(self, result: dict) -> dict:
        """The row of a matmul result (ok): the floor of its case, or (``PEAK``) the rate."""
        mm = result["total"]["median_s"]
        rate = 2.0 * result["n"] * result["m"] * result["d"] / mm
        self.peak_rate[result["dtype"]] = max(self.peak_rate.get(result["dtype"], 0.0), rate)
        is_peak = result["impl"] == PEAK
        if not is_peak:
            self.floor_s[case_key(result)] = self.gemms * mm
        return {**self.env, "suite": self.op, "impl": result["impl"], "impl_kind": "reference",
                "n": result["n"], "m": result["m"], "d": result["d"], "dtype": result["dtype"],
                "status": "ok", "total_median_ms": (mm if is_peak else self.gemms * mm) * 1e3,
                "tflops": rate / 1e12}

    def measured(self, result: dict) -> dict:
        """The row of an implementation's result (any status)."""
        impl = result["impl"]
        row = {**self.env, "suite": self.op, "impl": impl, "impl_kind": self.kind(impl),
               "impl_version": self.version(impl),
               "n": result["n"], "m": result["m"], "d": result["d"], "dtype": result["dtype"],
               "status": result["status"], "error": result.get("error"), "note": result.get("note") or None}
        if result["status"] != "ok" or "total" not in result:
            return row
        total = result["total"]["median_s"]
        flops = common.op_flops(self.op, row["n"], row["m"], row["d"])
        for part in ("fwd", "bwd", "total"):
            row[f"{part}_median_ms"] = result[part]["median_s"] * 1e3
            row[f"{part}_q20_ms"] = result[part]["q20_s"] * 1e3
            row[f"{part}_q80_ms"] = result[part]["q80_s"] * 1e3
        row["samples"] = result["total"]["samples"]
        row["tflops"] = flops / total / 1e12
        peak = self.peak_rate.get(row["dtype"])
        row["mm_peak_tflops"] = peak / 1e12 if peak else None
        row["pct_of_mm_peak"] = 100.0 * flops / total / peak if peak else None
        floor = self.floor_s.get(case_key(row))
        row["matmul_floor_ms"] = floor * 1e3 if floor else None
        row["x_floor"] = total / floor if floor else None
        if impl == self.baseline:
            self.baseline_s[case_key(row)] = total
        base = self.baseline_s.get(case_key(row))
        row[f"speedup_vs_{self.baseline}"] = base / total if base else None
        row["peak_mib"], row["extra_mib"] = result["peak_mib"], result["extra_mib"]
        row["inputs_mib"], row["rel_err"] = result["inputs_mib"], result.get("rel_err")
        return row
