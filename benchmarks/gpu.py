"""The GPU run: build, GPU tests and the GPU benchmark suite in one command, within a time budget.

    python -m benchmarks.gpu OUT [--budget 470] [--wheels DIR] [--pack] [--skip build tests]
    python -m benchmarks.gpu OUT --dry-run            # the same stages on CPU at quick sizes
    python -m benchmarks.gpu --collect OUT_OR_TARBALL # add a GPU run's rows to benchmarks/results/

For a freshly started GPU machine with no network (torch and triton
preinstalled, the repository copied to the working directory). Stages, each
with its own share of ``--budget`` seconds (default 470: under 8 minutes),
its log in OUT, and a timeout after which it is stopped and the next one runs:

1. env      versions, nvidia-smi                                       -> OUT/env.txt
2. wheels   optional peers (memeff, inf_cl, open_clip_torch) installed
            offline from ``--wheels DIR`` (default: ./.whl when present)
            into a temporary folder put on PYTHONPATH                -> OUT/wheels.log
3. build    the extension, ``python setup.py build_ext --inplace``
            (TORCH_CUDA_ARCH_LIST defaults to this GPU's arch, MAX_JOBS to
            the core count); a build that fails or has no sources leaves the
            Triton and torch backends                                  -> OUT/build.log
4. tests    ``pytest -m cuda tests``                                   -> OUT/tests.log
5. bench    ``python -m benchmarks --results-dir OUT --time-budget ...``:
            every suite at its GPU sizes (contrastive: N 8192/32768/65536,
            D 512/768/1024, bf16 and fp32, every implementation; max batch
            at D = 768 within ``--memory-budget`` GiB; the primitive; the
            similarity; multiple_negatives_loss against sentence-transformers
            when installed), the CSV/JSONL rows and PNG plots into OUT -> OUT/bench.log
6. summary  OUT/summary.md: stage results, backends, the result tables

Whatever happens, OUT ends up with what was done (a stage that fails or
times out is reported and the next one runs). ``--pack`` then bundles OUT
into OUT/results.tar.gz and keeps beside it only summary.md, bench.log and
the main plots (a tool that fetches at most 8 files gets everything).

Peers on a machine with no network: on a machine with one, download their
wheels (pure Python, py3-none-any) into ./.whl, which travels with the repo:

    python -m pip download --no-deps -d .whl memeff inf_cl open_clip_torch

(--no-deps: torch and triton are on the GPU machine already; open_clip's
loss module is loaded on its own, so its other dependencies are not needed.)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common

ROOT = common.ROOT
SITE = Path(tempfile.gettempdir()) / "mmkernels-gpu-site"
STAGES = ("env", "wheels", "build", "tests", "bench")
# Longest share of the budget a stage may take (seconds); the bench gets what is left.
STAGE_CAP = {"env": 30, "wheels": 60, "build": 200, "tests": 120}
KEEP_UNPACKED = ("summary.md", "bench.log", "contrastive_time_cuda.png", "contrastive_memory_cuda.png",
                 "max_batch_cuda.png", "contrastive_time_cpu.png")


def run_stage(name: str, cmd: list[str], log_path: Path, timeout: float, env: dict | None = None,
              ok_codes: tuple[int, ...] = (0,)) -> dict:
    """Run ``cmd`` (output to ``log_path`` and to our stdout) for at most ``timeout`` s."""
    started = time.time()
    shown = " ".join(cmd if cmd[1:2] != ["-c"] else cmd[:2] + ["..."])
    print(f"\n### {name}: {shown} (up to {timeout:.0f} s)", flush=True)
    with open(log_path, "w") as log:
        log.write(f"$ {shown}\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
        except OSError as error:
            log.write(f"cannot start: {error}\n")
            return {"stage": name, "status": "error", "rc": None, "seconds": 0.0, "note": str(error)}

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            status = "ok" if rc in ok_codes else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            rc = proc.wait()
            status = "timeout"
        reader.join(timeout=10)
        seconds = time.time() - started
        log.write(f"\n[{name}: {status}, exit status {rc}, {seconds:.0f} s]\n")
    print(f"### {name}: {status} ({seconds:.0f} s)", flush=True)
    return {"stage": name, "status": status, "rc": rc, "seconds": seconds}


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


ENV_REPORT = """
import platform, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
if torch.cuda.is_available():
    print("capability", torch.cuda.get_device_capability(), "memory GiB",
          round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
try:
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
except (OSError, subprocess.SubprocessError) as error:
    print("nvidia-smi:", error)
"""

BACKENDS_REPORT = """
import json, torch, mmkernels
from mmkernels import _extension
print(json.dumps({"cuda": mmkernels.available_backends("cuda") if torch.cuda.is_available() else [],
                  "cpu": mmkernels.available_backends("cpu"), "extension": _extension.why_unavailable() or "loaded"}))
"""


def _cuda_arch() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except Exception:
        pass
    return None


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.get(key, "")
            try:
                number = float(value)
                value = f"{number:.3g}" if abs(number) < 1000 else f"{number:.0f}"
            except (TypeError, ValueError):
                pass
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_summary(out: Path, stages: list[dict], backends: str, started: float) -> Path:
    parts = [f"# mmkernels GPU run ({time.strftime('%Y-%m-%d %H:%M:%S')}, {time.time() - started:.0f} s)\n",
             "## Stages\n", _table(stages, [("stage", "stage"), ("status", "status"), ("exit", "rc"),
                                            ("seconds", "seconds"), ("note", "note")]),
             f"\nBackends after the build: `{backends.strip()}`\n"]
    contrastive = [r for r in _read_csv(out / "contrastive.csv") if r.get("impl") != "matmul peak"]
    if contrastive:
        parts += ["## contrastive_loss forward + backward\n", _table(contrastive, [
            ("impl", "impl"), ("N", "n"), ("D", "d"), ("dtype", "dtype"), ("status", "status"),
            ("fwd ms", "fwd_median_ms"), ("bwd ms", "bwd_median_ms"), ("total ms", "total_median_ms"),
            ("q20", "total_q20_ms"), ("q80", "total_q80_ms"), ("TFLOP/s", "tflops"),
            ("% mm peak", "pct_of_mm_peak"), ("x floor", "x_floor"), ("vs naive", "speedup_vs_naive"),
            ("peak MiB", "peak_mib"), ("rel err", "rel_err"), ("error", "error")])]
    max_batch = _read_csv(out / "max_batch.csv")
    if max_batch:
        parts += ["\n## maximum batch\n", _table(max_batch, [
            ("impl", "impl"), ("D", "d"), ("dtype", "dtype"), ("budget MiB", "memory_budget_mib"),
            ("max N", "max_n"), ("limited by", "limited_by"), ("failed at", "first_failing_n"),
            ("peak MiB", "peak_mib_at_max"), ("step s", "step_s_at_max"), ("reason", "fail_reason")])]
    for name in ("logsumexp", "similarity"):
        rows = [r for r in _read_csv(out / f"{name}.csv") if r.get("impl") != "matmul peak"]
        if rows:
            parts += [f"\n## {name}\n", _table(rows, [
                ("impl", "impl"), ("N", "n"), ("D", "d"), ("dtype", "dtype"), ("status", "status"),
                ("total ms", "total_median_ms"), ("TFLOP/s", "tflops"), ("peak MiB", "peak_mib"),
                ("error", "error")])]
    embedding = [r for r in _read_csv(out / "embedding.csv") if r.get("impl") != "matmul peak"]
    if embedding:  # the note says k and the directions (benchmarks/bench_embedding.py)
        parts += ["\n## multiple_negatives_loss vs sentence-transformers\n", _table(embedding, [
            ("impl", "impl"), ("N", "n"), ("D", "d"), ("dtype", "dtype"), ("case", "note"),
            ("status", "status"), ("total ms", "total_median_ms"), ("TFLOP/s", "tflops"),
            ("x floor", "x_floor"), ("vs theirs", "speedup_vs_sentence-transformers"),
            ("peak MiB", "peak_mib"), ("extra MiB", "extra_mib"), ("error", "error")])]
    for stage in stages:
        if stage["status"] not in ("ok", "skipped"):
            log = out / f"{stage['stage']}.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-30:]
                parts += [f"\n## {stage['stage']} ({stage['status']}): end of {log.name}\n", "```",
                          *tail, "```"]
    path = out / "summary.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def pack(out: Path) -> Path:
    """Bundle OUT into OUT/results.tar.gz; keep only the few files a reader wants first."""
    tarball = out / "results.tar.gz"
    files = sorted(p for p in out.rglob("*") if p.is_file() and p != tarball)
    with tarfile.open(tarball, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(out)))
    for path in files:
        if path.name not in KEEP_UNPACKED:
            path.unlink()
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    return tarball


def collect(source: Path, into: Path = common.RESULTS_DIR) -> None:
    """Append the rows of a GPU run (its OUT folder or results.tar.gz) to ``into``
    (benchmarks/results/; runs already there are left out) and redraw the plots."""
    with tempfile.TemporaryDirectory() as tmp:
        if source.is_file():
            with tarfile.open(source) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:
                    tar.extractall(tmp)
            source = Path(tmp)
        for jsonl in sorted(source.glob("*.jsonl")):
            rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
            target = into / jsonl.name
            existing = ({json.loads(line).get("run_id") for line in target.read_text().splitlines()
                         if line.strip()} if target.exists() else set())
            new = [row for row in rows if row.get("run_id") not in existing]
            if new:
                common.append_rows(jsonl.stem, new, into)
            print(f"{jsonl.stem}: {len(new)} new rows ({len(rows) - len(new)} already there)")
    try:
        from benchmarks import plot

        for path in plot.plot_all(into):
            print(path)
    except ImportError as error:
        print(f"plots skipped ({error})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", help="folder for the results and logs (created)")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for everything (default 470)")
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install offline (default ./.whl)")
    parser.add_argument("--memory-budget", type=float, help="GiB for the maximum-batch search (default 8)")
    parser.add_argument("--skip", nargs="+", default=[], choices=STAGES, help="stages to leave out")
    parser.add_argument("--suites", nargs="+", help="benchmark suites (default: all)")
    parser.add_argument("--pack", action="store_true", help="bundle OUT into OUT/results.tar.gz at the end")
    parser.add_argument("--dry-run", action="store_true",
                        help="on CPU at quick sizes: checks the script where there is no GPU")
    parser.add_argument("--collect", type=Path, metavar="OUT_OR_TARBALL",
                        help="instead of running: add a GPU run's rows to benchmarks/results/")
    parser.add_argument("--into", type=Path, default=common.RESULTS_DIR,
                        help="with --collect: the results folder to add to (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.collect:
        collect(args.collect, args.into)
        return 0
    if args.out is None:
        parser.error("OUT is required")

    started = time.time()
    deadline = started + args.budget
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    paths = [str(ROOT)]
    stages: list[dict] = []
    backends = "unknown"

    def left(reserve: float = 0.0) -> float:
        return deadline - time.time() - reserve

    def skipped(name: str, note: str) -> None:
        stages.append({"stage": name, "status": "skipped", "rc": None, "seconds": 0.0, "note": note})
        print(f"\n### {name}: skipped ({note})", flush=True)

    try:
        if "env" in args.skip:
            skipped("env", "--skip")
        else:
            stages.append(run_stage("env", _python(ENV_REPORT), out / "env.txt", STAGE_CAP["env"], env))

        wheels = args.wheels or (ROOT / ".whl")
        if "wheels" in args.skip:
            skipped("wheels", "--skip")
        elif not wheels.is_dir() or not list(wheels.glob("*.whl")):
            skipped("wheels", f"no wheels in {wheels}")
        else:
            stages.append(run_stage("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                               "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                                               "--target", str(SITE), *map(str, sorted(wheels.glob("*.whl")))],
                                    out / "wheels.log", min(STAGE_CAP["wheels"], left(60)), env))
            if stages[-1]["status"] == "ok":
                paths.append(str(SITE))
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])

        if "build" in args.skip:
            skipped("build", "--skip")
        else:
            build_env = dict(env)
            build_env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
            arch = _cuda_arch()
            if arch:
                build_env.setdefault("TORCH_CUDA_ARCH_LIST", arch)
            stages.append(run_stage("build", [sys.executable, "setup.py", "build_ext", "--inplace"],
                                    out / "build.log", min(STAGE_CAP["build"], left(150)), build_env))
        try:
            probe = subprocess.run(_python(BACKENDS_REPORT), cwd=ROOT, env=env, capture_output=True,
                                   text=True, timeout=120)
            backends = probe.stdout.strip() or (probe.stderr.strip().splitlines() or ["?"])[-1]
        except subprocess.TimeoutExpired:
            backends = "the backend probe timed out"
        print(f"\nbackends: {backends}", flush=True)

        if "tests" in args.skip:
            skipped("tests", "--skip")
        else:
            result = run_stage("tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests",
                                         "-p", "no:cacheprovider", "-rs"],
                               out / "tests.log", min(STAGE_CAP["tests"], left(120)), env, ok_codes=(0, 5))
            if result["rc"] == 5:  # pytest: no test selected
                result["note"] = "no test marked cuda was collected"
            stages.append(result)

        if "bench" in args.skip:
            skipped("bench", "--skip")
        else:
            cmd = [sys.executable, "-m", "benchmarks", "--results-dir", str(out)]
            if args.dry_run:
                cmd += ["--quick", "--device", "cpu"]
            if args.memory_budget:
                cmd += ["--memory-budget", str(args.memory_budget)]
            if args.suites:
                cmd += ["--suites", *args.suites]
            # The suite plans its cases to end by its own budget; the stage timeout is the backstop.
            bench_budget = max(30.0, left(20))
            cmd += ["--time-budget", f"{bench_budget * 0.85:.0f}"]
            stages.append(run_stage("bench", cmd, out / "bench.log", bench_budget, env))
    finally:
        summary = write_summary(out, stages, backends, started)
        print(f"\nsummary: {summary}")
        if args.pack:
            print(f"packed: {pack(out)}")
        print(f"total {time.time() - started:.0f} s; results in {out}", flush=True)
    return 0 if all(s["status"] in ("ok", "skipped") for s in stages) else 1


if __name__ == "__main__":
    raise SystemExit(main())
