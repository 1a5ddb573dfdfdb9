"""Benchmark of mmkernels.multiple_negatives_loss against sentence-transformers' MultipleNegativesRankingLoss.

    python -m benchmarks.bench_embedding [--n 8192] [--k 1] [--directions all] [--d 768]
                                         [--impl sentence-transformers cpu] [--reps 3] [--quick]

Forward + backward of the loss on the same embeddings (gradients of the
queries and of every document block; cosine similarity, scale 20, joint
partition): ``sentence-transformers`` is their
``MultipleNegativesRankingLoss(None, scale=20, directions=...)
.compute_loss_from_embeddings([query, positives, negatives...], None)``
(it materializes every (N, N*(1+k)) block of scores, twice for doc_to_query),
and each mmkernels backend available on the device runs
``multiple_negatives_loss(query, [positives, negatives...], directions=...,
backend=...)``. Directions: ``query_to_doc`` alone ("one") or all four
("all"); k = 0 or 1 hard negatives per query.

What the columns count. A case's ``m`` is not the number of documents but the
candidate columns of the products mmkernels performs, so that the run's FLOP
and floor formula (four N x m x D products, one forward, three backward: see
benchmarks/common.py) holds: ``N*(1+k)`` for query_to_doc alone (q x d), and
``N*(3+2k)`` for all four directions (q x d, q x q and d+ x d; doc_to_query
comes from the column statistics of q x d). TFLOP/s is 8*N*m*D over the time,
for sentence-transformers too (its own count at k = 1, all directions, is
36*N^2*D, against mmkernels' 40*N^2*D); ``x floor`` is the time over the
same-run matmul floor of those products. The directions and k of a case are
read back from m / N (1, 2: one direction; 3, 5: all four), hence k in {0, 1}.
``rel_err``: the loss value against the torch backend in fp32.

CPU: each case runs under an address-space guard of ``MEMORY_BUDGET_GIB``, so
that sentence-transformers' largest cases fail at once as "oom" instead of
swapping a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util

import torch

from benchmarks import implementations
from benchmarks._memory import guard_memory
from benchmarks._results import Case, SuiteOptions, Workload
from benchmarks.suite import OpSuite, available

SCALE = 20.0  # sentence-transformers' default scale (temperature 0.05)
THEIRS = "sentence-transformers"
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
DIRECTIONS = {"one": ("query_to_doc",), "all": ALL}
MEMORY_BUDGET_GIB = {"cpu": 12.0}  # theirs at N = 8192, k = 1, all directions fits


# --- the cases: (N, k, directions) <-> Case -----------------------------------------------

def candidate_columns(n: int, k: int, directions: str) -> int:
    """The m of the case: N*(1+k) (q x d) alone, or with q x q and d+ x d, N*(3+2k)."""
    return n * (1 + k) if directions == "one" else n * (3 + 2 * k)


_LAYOUTS = {(1, "one"): 0, (2, "one"): 1, (3, "all"): 0, (5, "all"): 1}  # (m/N, directions): k


def layout(case: Case) -> tuple[int, str]:
    """(k, directions) of a case built by :func:`embedding_case`."""
    for (ratio, directions), k in _LAYOUTS.items():
        if case.m == ratio * case.n:
            return k, directions
    raise ValueError(f"not a case of this suite: m = {case.m} for N = {case.n} "
                     f"(expected m / N in 1, 2, 3, 5)")


def embedding_case(n: int, k: int, directions: str, d: int, dtype: str) -> Case:
    if k not in (0, 1):
        raise ValueError(f"k: this suite measures 0 or 1 hard negatives, got {k}")
    return Case(n, candidate_columns(n, k, directions), d, dtype)


def default_cases(device: str, quick: bool) -> list[Case]:
    """Quick: N = 256, D = 64, all directions, k = 1. CPU: N = 2048..16384, D = 768,
    fp32, every (directions, k), the targets' layout first (a time budget cuts the
    tail). GPU: bf16, N = 8192 and 32768."""
    if quick:
        return [embedding_case(256, 1, "all", 64, "float32")]
    ns, dtype = ((8192, 32768), "bfloat16") if device == "cuda" else ((2048, 4096, 8192, 16384), "float32")
    return [embedding_case(n, k, directions, 768, dtype)
            for directions, k in (("all", 1), ("all", 0), ("one", 1), ("one", 0)) for n in ns]


def impls_for(device: str, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    names, notes = available([THEIRS] + implementations.mmkernels_backends(device), wanted)
    if THEIRS in names and importlib.util.find_spec("sentence_transformers") is None:
        names.remove(THEIRS)
        notes[THEIRS] = "not installed (pip install sentence-transformers)"
    return names, notes


def kind(name: str) -> str:
    return "peer" if name == THEIRS else "mmkernels"


def version(name: str) -> str | None:
    if name == THEIRS:
        return importlib.metadata.version("sentence-transformers")
    return implementations.version(name)


# --- targets (issue 16), checked on the rows of the run ----------------------------------

TARGET_N = {"cpu": 8192}
MAX_X_FLOOR = 1.15


def check_targets(rows: list[dict], device: str) -> list[str]:
    """All four directions, k = 1, N = 8192, D = 768 fp32 (CPU): each mmkernels backend
    no slower than sentence-transformers and within MAX_X_FLOOR of the floor."""
    if device not in TARGET_N:
        return []
    case = embedding_case(TARGET_N[device], 1, "all", 768, "float32")
    ok_rows = {r["impl"]: r for r in rows if r.get("status") == "ok"
               and (r["n"], r["m"], r["d"], r["dtype"]) == case.key()}
    theirs = ok_rows.get(THEIRS)
    lines = []
    for impl, row in ok_rows.items():
        if row.get("impl_kind") != "mmkernels":  # theirs, the matmul floor and peak
            continue
        speedup = theirs["total_median_ms"] / row["total_median_ms"] if theirs else None
        x_floor = row.get("x_floor")
        checks = [("vs " + THEIRS, speedup, speedup is not None and speedup >= 1.0, ">= 1"),
                  ("x floor", x_floor, x_floor is not None and x_floor <= MAX_X_FLOOR, f"<= {MAX_X_FLOOR}")]
        parts = [f"{name} {'n/a' if value is None else f'{value:.2f}'} {limit} {'ok' if met else 'MISSED'}"
                 for name, value, met, limit in checks]
        lines.append(f"target {impl} N={case.n} k=1 all directions D={case.d}: " + ", ".join(parts)
                     + f" -> {'met' if all(c[2] for c in checks) else 'NOT met'}")
    return lines


# --- child: one implementation, one case ---------------------------------------------------

def prepare(impl: str, case: Case, device: str) -> Workload:
    import mmkernels

    k, directions = layout(case)
    directions = DIRECTIONS[directions]
    if impl == THEIRS:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        theirs = MultipleNegativesRankingLoss(None, scale=SCALE, directions=directions)

        def loss_fn(query, docs):
            return theirs.compute_loss_from_embeddings([query, *docs], None)
    else:
        def loss_fn(query, docs):
            return mmkernels.multiple_negatives_loss(query, docs, logit_scale=SCALE,
                                                     directions=directions, backend=impl)
    guard_memory(device, MEMORY_BUDGET_GIB.get(device, 0.0) * 1024)  # after the imports

    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case.dtype)
    query = torch.randn(case.n, case.d, device=device, dtype=dtype, generator=gen)
    # positives near their queries, hard negatives less so: a loss in its training range
    docs = [(query + torch.randn(case.n, case.d, device=device, dtype=dtype, generator=gen) * noise)
            for noise in (1.0, 2.0)[:1 + k]]
    leaves = [query.requires_grad_(), *(d.requires_grad_() for d in docs)]

    def zero_grad():
        for x in leaves:
            x.grad = None

    def error(loss):
        with torch.no_grad():
            ref = mmkernels.multiple_negatives_loss(query.float(), [d.float() for d in docs],
                                                    logit_scale=SCALE, directions=directions,
                                                    backend="torch")
        return abs(float(loss) - float(ref)) / abs(float(ref))

    feature_bytes = sum(x.numel() * x.element_size() for x in leaves)
    return Workload(forward=lambda: loss_fn(query, docs), backward=lambda loss: loss.backward(),
                    zero_grad=zero_grad, inputs_bytes=feature_bytes, grads_bytes=feature_bytes,
                    error=error, note=f"k={k}, {len(directions)} direction{'s' * (len(directions) > 1)}")


# --- the suite --------------------------------------------------------------------------

class EmbeddingSuite(OpSuite):
    """An op suite whose cases are (N, k, directions, D, dtype): its own command-line sizes,
    and at quick sizes sentence-transformers against one mmkernels backend only."""

    def run_suite(self, options: SuiteOptions) -> list[dict]:
        if options.quick and options.impls is None:
            names = self.impls(options.device, None)[0]
            options = dataclasses.replace(options, impls=names[:2])
        return self.run(self.cases(options.device, options.quick), options)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n", type=int, nargs="+", help="batch sizes N (default: the suite's)")
        parser.add_argument("--k", type=int, nargs="+", choices=[0, 1], help="hard negatives per query")
        parser.add_argument("--directions", nargs="+", choices=sorted(DIRECTIONS),
                            help="'one' (query_to_doc) or 'all' four")
        parser.add_argument("--d", type=int, nargs="+", help="embedding dimensions D")
        parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"])
        parser.add_argument("--reps", type=int, help="timed iterations per case")

    def run_args(self, args: argparse.Namespace, options: SuiteOptions) -> list[dict]:
        shapes = [(c.n, *layout(c), c.d, c.dtype) for c in self.cases(args.device, args.quick)]

        def pick(given, index):  # the command line's values, else the default cases'
            return given or sorted({shape[index] for shape in shapes})

        cases = [embedding_case(n, k, directions, d, dtype)
                 for directions in pick(args.directions, 2) for k in pick(args.k, 1)
                 for dtype in pick(args.dtype, 4) for d in pick(args.d, 3) for n in pick(args.n, 0)]
        return self.run(cases, options)


SUITE = EmbeddingSuite("benchmarks.bench_embedding", __doc__, order=60, weight=1.0, op="embedding",
                       title="multiple_negatives_loss vs sentence-transformers' MultipleNegativesRankingLoss, "
                             "forward + backward (cos_sim, scale 20)",
                       prepare=prepare, impls=impls_for, cases=default_cases, baseline=THEIRS, kind=kind,
                       version=version, quick_floor=False, report=check_targets)

if __name__ == "__main__":
    SUITE.main()
