"""Training benchmarks: the largest contrastive batch that trains within a
memory budget, and the learning curve of the default training run.

    python -m benchmarks.bench_train max-batch [--budget-gib 8] [--model tiny]
                                               [--config naive naive+cache mmkernels mmkernels+cache]
    python -m benchmarks.bench_train curve [-- extra trainer arguments]

max-batch: for each configuration (loss backend, with or without gradient
caching), one training step of ``python -m mmkernels.train`` at contrastive
batch N runs in a fresh process; N fits when the process's peak resident
memory (VmHWM: model, optimizer, the batch, activations, the loss) stays
within the budget. A watchdog kills a probe whose RSS passes the budget (it
does not fit), so the search never takes the machine's memory. N doubles
from ``--start`` until it does not fit (or reaches ``--max-n``), then
bisects to within 1/8. Rows go to results/train_max_batch.{csv,jsonl}
(every probe to train_max_batch_probes.*) and a bar chart to
results/train_max_batch.png.

curve: runs the README's default training command, times it, and keeps its
metrics (results/train_default_metrics.jsonl), its curves
(results/train_learning_curve.png) and a summary row
(results/train_default_run.{csv,jsonl}).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks import common

MODULE = "benchmarks.bench_train"
# name -> (loss backend, gradient caching)
CONFIGS = {
    "naive": ("naive", False),
    "naive+cache": ("naive", True),
    "mmkernels": ("auto", False),
    "mmkernels+cache": ("auto", True),
}


# --- child: one training step in its own process --------------------------------

def _child(spec: dict) -> None:
    from mmkernels import train

    out = tempfile.mkdtemp(prefix="mmk-maxbatch-")
    try:
        argv = ["--model", spec["model"], "--batch-size", str(spec["n"]), "--steps", str(spec["steps"]),
                "--loss", spec["loss"], "--val-data", "none", "--no-plot", "--output", out,
                "--save-every", "0", "--log-every", "1"]
        if spec.get("micro"):
            argv += ["--micro-batch", str(spec["micro"])]
        trainer = train.Trainer(train.build_parser().parse_args(argv))
        trainer.prepare()
        t0 = time.perf_counter()
        code = trainer.run()
        seconds = time.perf_counter() - t0
        record = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"exit": code, "peak_rss_mib": common.rss_mib("VmHWM"), "run_s": seconds,
                      "loss_value": record.get("loss"), "loss_backend": trainer.loss_name}))


# --- parent: probes under a memory watchdog ----------------------------------------

def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def probe(spec: dict, budget_mib: float, timeout: float) -> dict:
    """Run one child; kill it when its RSS passes the budget. Returns its record."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", MODULE, "--child", json.dumps(spec)], cwd=common.ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, watched_max, killed = time.monotonic(), 0.0, None
    while proc.poll() is None:
        watched_max = max(watched_max, _rss_mib(proc.pid))
        if watched_max > budget_mib:
            killed = f"RSS passed {budget_mib:.0f} MiB"
        elif time.monotonic() - start > timeout:
            killed = f"timeout after {timeout:.0f} s"
        if killed:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    row = {**spec, "wall_s": round(time.monotonic() - start, 1)}
    if killed:
        return {**row, "fits": False, "peak_rss_mib": round(watched_max), "note": f"killed: {killed}"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["failed"])[-1]
        oom = proc.returncode in (-9, 137) or "memory" in tail.lower()
        return {**row, "fits": False, "peak_rss_mib": round(watched_max),
                "note": ("out of memory: " if oom else "failed: ") + tail[:200]}
    result = json.loads(lines[-1])
    peak = result["peak_rss_mib"]
    return {**row, "fits": peak <= budget_mib, "peak_rss_mib": round(peak, 1),
            "run_s": round(result["run_s"], 1), "loss_backend": result["loss_backend"],
            "loss_value": result["loss_value"]}


def search(name: str, args, log) -> tuple[dict, list[dict]]:
    loss, cache = CONFIGS[name]
    budget = args.budget_gib * 1024

    def run(n):
        spec = {"model": args.model, "n": n, "loss": loss, "steps": args.steps,
                "micro": args.micro_batch if cache and n > args.micro_batch else None}
        row = probe(spec, budget, args.timeout)
        row["config"] = name
        log(f"  {name:16s} N={n:7d}: {'fits' if row['fits'] else 'does not fit':12s} "
            f"peak {row['peak_rss_mib']:8.0f} MiB  ({row['wall_s']:.0f} s){'  ' + row.get('note', '')}")
        return row

    probes, fit, fail = [], None, None
    n = args.start
    while n <= args.max_n:
        row = run(n)
        probes.append(row)
        if not row["fits"]:
            fail = row
            break
        fit = row
        n *= 2
    while fit and fail and fail["n"] - fit["n"] > max(256, fit["n"] // 8):
        mid = (fit["n"] + fail["n"]) // 2 // 256 * 256
        row = run(mid)
        probes.append(row)
        fit, fail = (row, fail) if row["fits"] else (fit, row)
    summary = {"config": name, "model": args.model, "loss": loss,
               "micro_batch": args.micro_batch if cache else None,
               "budget_gib": args.budget_gib, "max_batch": fit["n"] if fit else 0,
               "peak_rss_mib_at_max": fit["peak_rss_mib"] if fit else None,
               "first_failing_batch": fail["n"] if fail else None,
               "capped_at_max_n": fail is None, "step_s_at_max": fit.get("run_s") if fit else None,
               "loss_backend": fit.get("loss_backend") if fit else None}
    return summary, probes


def plot_max_batch(rows: list[dict], path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["config"] for r in rows]
    values = [r["max_batch"] for r in rows]
    bars = ax.barh(names, values, color=["#bbbbbb", "#999999", "#6a9fd4", "#1f5fa8"][:len(rows)])
    for bar, r in zip(bars, rows):
        label = f"{r['max_batch']:,}" + (" (search cap)" if r["capped_at_max_n"] else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax.axvline(16384, color="k", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("largest contrastive batch that trains (one process)")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def max_batch(args) -> None:
    env = common.environment()
    rows, all_probes = [], []
    print(f"max-batch search: model {args.model}, budget {args.budget_gib} GiB peak RSS, "
          f"micro-batch {args.micro_batch} with caching; {env['device']}", flush=True)
    for name in args.config:
        summary, probes = search(name, args, lambda s: print(s, flush=True))
        rows.append({**summary, **env})
        all_probes += [{**p, **env} for p in probes]
        print(json.dumps(summary), flush=True)
    if args.save:
        common.results_dir().mkdir(parents=True, exist_ok=True)
        common.append_rows("train_max_batch", rows)
        common.append_rows("train_max_batch_probes", all_probes)
        plot_max_batch(rows, common.results_dir() / "train_max_batch.png",
                       f"{args.model} CLIP, one training step within {args.budget_gib} GiB peak RSS, "
                       f"{env['device']}, {env['date'][:10]}")


# --- learning curve of the default command ---------------------------------------------

def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def curve(args, extra: list[str]) -> None:
    env = common.environment()
    out = tempfile.mkdtemp(prefix="mmk-curve-")
    cmd = [sys.executable, "-m", "mmkernels.train", "--output", out, *extra]
    print("running:", " ".join(cmd[1:]), flush=True)
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), child_env.get("PYTHONPATH")]))
    t0, cpu0 = time.monotonic(), _children_cpu_s()
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=child_env, stdout=subprocess.PIPE, text=True)
    stdout, _ = proc.communicate()
    wall, cpu = time.monotonic() - t0, _children_cpu_s() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"training failed with exit code {proc.returncode}")
    summary = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    row = {"command": "python -m mmkernels.train " + " ".join(extra), "wall_s": round(wall, 1),
           "cpu_s": round(cpu, 1),
           **{k: v for k, v in summary.items() if k != "output"}, **env}
    print(json.dumps(row), flush=True)
    if args.save:
        common.results_dir().mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(out, "metrics.jsonl"), common.results_dir() / "train_default_metrics.jsonl")
        shutil.copy(os.path.join(out, "curves.png"), common.results_dir() / "train_learning_curve.png")
        common.append_rows("train_default_run", [row])
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    mb = sub.add_parser("max-batch", help="largest contrastive batch within a memory budget")
    mb.add_argument("--budget-gib", type=float, default=8.0)
    mb.add_argument("--model", default="tiny")
    mb.add_argument("--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    mb.add_argument("--micro-batch", type=int, default=256, help="encoder chunk of the +cache configs")
    mb.add_argument("--start", type=int, default=1024)
    mb.add_argument("--max-n", type=int, default=131072, help="search cap")
    mb.add_argument("--steps", type=int, default=1, help="training steps per probe")
    mb.add_argument("--timeout", type=float, default=3600, help="seconds per probe")
    mb.add_argument("--no-save", dest="save", action="store_false")
    cv = sub.add_parser("curve", help="learning curve of the default training command")
    cv.add_argument("--no-save", dest="save", action="store_false")
    args, extra = parser.parse_known_args()
    if args.mode == "max-batch":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        max_batch(args)
    else:
        curve(args, [a for a in extra if a != "--"])


if __name__ == "__main__":
    main()
