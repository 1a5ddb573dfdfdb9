"""The benchmark suite stays alive: its quick mode runs end to end, and what it writes is right.

One run of ``python -m benchmarks --quick`` (the CI command, small sizes) in a
subprocess, shared by the tests that read its output; plus the GPU script's
CPU dry run, and the pieces with logic of their own (the maximum-batch
search, the FLOP formula) on their own.
"""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_contrastive, bench_max_batch, common, gpu  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reads /proc")

TIMED = ("fwd", "bwd", "total")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop(common.RUN_ID_ENV, None)
    env.pop(common.RESULTS_ENV, None)
    return env


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The GPU script's dry run: its bench stage is the quick suite,
    ``python -m benchmarks --quick --results-dir OUT`` (what CI keeps alive), on CPU."""
    out = tmp_path_factory.mktemp("bench")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", str(out), "--dry-run", "--budget", "1500",
                           "--skip", "build", "tests"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    return out, proc, time.time() - started


def test_quick_mode_runs_and_prints_the_tables(quick_run):
    out, proc, seconds = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "python -m benchmarks --results-dir" in proc.stdout and "--quick" in proc.stdout
    for title in ("contrastive_loss forward + backward", "maximum batch", "similarity_logsumexp",
                  "normalized_similarity"):
        assert title in proc.stdout
    assert "failed suites" not in proc.stdout
    print(f"quick mode (GPU script dry run) took {seconds:.0f} s")


def test_rows_are_complete_and_stamped(quick_run):
    out, proc, _ = quick_run
    rows = _rows(out / "contrastive.csv")
    measured = [r for r in rows if r["impl"] not in ("matmul floor", "matmul peak")]
    impls = {r["impl"] for r in measured}
    expected = {"naive", "compile(naive)", "torch"} | ({"open_clip"} if importlib.util.find_spec("open_clip") else set())
    assert expected <= impls, impls
    assert all(r["status"] == "ok" for r in measured), [(r["impl"], r["error"]) for r in measured]
    for r in measured:
        for field in ("device", "torch", "git_sha", "date", "run_id", "dtype", "n", "d",
                      "tflops", "pct_of_mm_peak", "x_floor", "peak_mib", "extra_mib"):
            assert r[field] not in ("", None), (field, r)
        for part in TIMED:
            q20, median, q80 = (float(r[f"{part}_{q}_ms"]) for q in ("q20", "median", "q80"))
            assert 0 < q20 <= median <= q80, (part, r)
        # TFLOP/s is the one formula, 8*N*N*D, over the median total time
        n, d = int(r["n"]), int(r["d"])
        assert float(r["tflops"]) == pytest.approx(8 * n * n * d / (float(r["total_median_ms"]) / 1e3) / 1e12,
                                                   rel=1e-6)
        # every implementation computes the same loss (checked against the torch backend in fp32)
        assert float(r["rel_err"]) < 1e-4, r
    assert all(r["status"] == "ok" for r in rows), [(r["impl"], r["error"]) for r in rows]
    assert {"matmul floor", "matmul peak"} <= {r["impl"] for r in rows}
    assert len({r["run_id"] for r in rows}) == 1
    jsonl = [json.loads(line) for line in (out / "contrastive.jsonl").read_text().splitlines()]
    assert len(jsonl) == len(rows)


def test_memory_grows_quadratically_for_naive_only(quick_run):
    """The measurement sees S: naive's peak grows about 4x per doubling of N (S is N x N);
    the tiled path's stays below it."""
    out, _, _ = quick_run
    rows = [r for r in _rows(out / "contrastive.csv") if r["status"] == "ok"]
    peak = {(r["impl"], int(r["n"])): float(r["peak_mib"]) for r in rows if r["peak_mib"]}
    ns = sorted({n for impl, n in peak if impl == "naive"})
    small, large = ns[0], ns[-1]
    assert large == 2 * small
    assert peak["naive", large] > 2.5 * peak["naive", small], peak
    assert peak["torch", large] < peak["naive", large] / 2, peak


def test_max_batch_search_finds_the_memory_limit(quick_run):
    out, _, _ = quick_run
    rows = {r["impl"]: r for r in _rows(out / "max_batch.csv")}
    naive, tiled = rows["naive"], rows["torch"]
    assert naive["limited_by"] == "memory"
    budget = float(naive["memory_budget_mib"])
    assert float(naive["peak_mib_at_max"]) <= budget
    trials = [t for t in _rows(out / "max_batch_trials.csv") if t["impl"] == "naive"]
    failed = [t for t in trials if t["fits"] != "True"]
    assert failed and min(int(t["n"]) for t in failed) == int(naive["first_failing_n"])
    assert int(tiled["max_n"]) > int(naive["max_n"])


def test_search_in_one_process_the_gpu_way():
    """The GPU's search path (one child runs every trial, each warmed up at its own N), on CPU."""
    settings = bench_max_batch.default_settings("cpu", quick=True, budget_gib=None)
    settings.in_process = True
    summary = bench_max_batch.search_in_child("naive", settings, "cpu", deadline=None)
    assert summary["limited_by"] == "memory", summary
    assert summary["peak_mib_at_max"] <= settings.budget_gib * 1024
    assert 256 <= summary["max_n"] < summary["first_failing_n"] <= 4096


def test_plots_are_drawn(quick_run):
    pytest.importorskip("matplotlib")
    out, _, _ = quick_run
    for name in ("contrastive_time_cpu.png", "contrastive_memory_cpu.png", "max_batch_cpu.png",
                 "logsumexp_time_cpu.png", "similarity_time_cpu.png"):
        path = out / name
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_gpu_script_writes_packs_and_collects_everything(quick_run, tmp_path):
    """The GPU script's plumbing on CPU: stages, logs, summary, the bundle, --collect."""
    out, _, _ = quick_run
    summary = (out / "summary.md").read_text()
    assert "| bench | ok |" in summary and "| build | skipped |" in summary
    assert "| naive | 2048 | 64 | float32 | ok |" in summary  # the result tables
    packed = tmp_path / "packed"
    shutil.copytree(out, packed)
    tarball = gpu.pack(packed)
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"env.txt", "bench.log", "summary.md", "contrastive.csv", "max_batch_trials.jsonl",
            "similarity.jsonl"} <= names, names
    assert len(list(packed.iterdir())) <= 8  # what a tool that fetches 8 files can take

    into = tmp_path / "results"
    for _ in range(2):  # the second time adds nothing: the run is there already
        gpu.collect(tarball, into)
    assert (len((into / "contrastive.jsonl").read_text().splitlines())
            == len((out / "contrastive.jsonl").read_text().splitlines()) > 0)


def test_gpu_script_stops_a_stage_at_its_timeout(tmp_path):
    started = time.time()
    result = gpu.run_stage("sleep", [sys.executable, "-c", "import time; print('started', flush=True); "
                                                          "time.sleep(60)"],
                           tmp_path / "sleep.log", timeout=2)
    assert result["status"] == "timeout" and time.time() - started < 30
    assert "started" in (tmp_path / "sleep.log").read_text()


def test_a_crashed_child_loses_only_its_own_cases(monkeypatch):
    """One child runs several implementations (the GPU way); when it dies, the ones it had
    not started run in a fresh child, and the dead one's cases are reported as errors."""
    from benchmarks._results import Case, Spec
    from benchmarks._subprocess import run_child_spec

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    cases = [Case(8, 8, 4, "float32"), Case(16, 16, 4, "float32")]
    spec = Spec("ok1", cases, "cpu", reps=2, max_seconds=0.1, deadline=None, then=["crash", "ok2"])
    seen = []
    results = run_child_spec("bench_child_stub", spec, seen.append, timeout=120)
    status = {(r["impl"], r["n"]): r["status"] for r in results}
    assert status == {("ok1", 8): "ok", ("ok1", 16): "ok", ("crash", 8): "error", ("crash", 16): "error",
                      ("ok2", 8): "ok", ("ok2", 16): "ok"}, status
    assert len(seen) == len(results) == 6


# --- the search and the formula, without running anything --------------------------------

def _fake_trial(peak_of, seconds_of=lambda n: 0.01):
    calls = []

    def trial(n):
        calls.append(n)
        return {"n": n, "status": "ok", "peak_mib": peak_of(n), "step_s": seconds_of(n)}

    return trial, calls


def test_search_doubles_then_bisects_to_the_budget():
    settings = bench_max_batch.Settings(d=64, dtype="float32", budget_gib=1.0, start_n=1024, granule=64,
                                        trial_seconds=60, max_n=1 << 20)
    trial, calls = _fake_trial(lambda n: 4 * n * n / 2**20)  # 4 bytes * N^2: fits up to N = 16384
    summary = bench_max_batch.search(trial, settings, deadline=None)
    assert summary["limited_by"] == "memory"
    assert 16384 * 0.95 <= summary["max_n"] <= 16384 < summary["first_failing_n"]
    assert calls[:5] == [1024, 2048, 4096, 8192, 16384]


def test_search_reports_a_lower_bound_when_trials_get_too_long():
    settings = bench_max_batch.Settings(d=64, dtype="float32", budget_gib=1.0, start_n=1024, granule=64,
                                        trial_seconds=10, max_n=1 << 20)
    trial, calls = _fake_trial(lambda n: n / 2**10, seconds_of=lambda n: (n / 1024) ** 2 * 0.1)
    summary = bench_max_batch.search(trial, settings, deadline=None)
    assert summary["limited_by"] == "time"
    assert summary["max_n"] == calls[-1] and summary["first_failing_n"] is None


def test_search_halves_when_the_start_does_not_fit():
    settings = bench_max_batch.Settings(d=64, dtype="float32", budget_gib=1 / 1024, start_n=4096, granule=64,
                                        trial_seconds=60, max_n=1 << 20)
    trial, _ = _fake_trial(lambda n: n / 1024)  # fits up to N = 1024
    summary = bench_max_batch.search(trial, settings, deadline=None)
    assert summary["limited_by"] == "memory" and 1024 * 0.95 <= summary["max_n"] <= 1024


def test_flop_formula():
    assert common.op_flops("contrastive", 3, 5, 7) == 8 * 3 * 5 * 7
    assert common.contrastive_flops(3, 5, 7, "fwd") == 2 * 3 * 5 * 7
    assert common.op_flops("similarity", 3, 5, 7) == 6 * 3 * 5 * 7


def _target_row(impl, total_ms, x_floor, speedup, extra_mib):
    case = bench_contrastive.TARGET_CASE_CPU
    return {"impl": impl, "n": case.n, "m": case.m, "d": case.d, "dtype": case.dtype, "status": "ok",
            "total_median_ms": total_ms, "x_floor": x_floor, "speedup_vs_naive": speedup,
            "extra_mib": extra_mib}


def test_targets_are_checked_on_the_rows_of_the_run():
    rows = [_target_row("naive", 20000, 2.5, 1.0, 4000), _target_row("torch", 9000, 1.2, 2.2, 100),
            _target_row("cpu", 9500, 1.05, 2.1, 150)]
    lines = bench_contrastive.check_targets(rows, "cpu")
    assert len(lines) == 2
    torch_line, cpu_line = lines
    assert torch_line.startswith("target torch N=16384") and torch_line.endswith("-> met")
    # cpu meets its own limits but is slower than the torch backend in this run.
    assert "vs torch 0.95 > 1 MISSED" in cpu_line and cpu_line.endswith("-> NOT met")
    assert bench_contrastive.check_targets(rows, "cuda") == []
    assert bench_contrastive.check_targets(rows[:1], "cpu") == []  # cases not measured: no line
