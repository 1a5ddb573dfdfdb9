"""PNG plots of benchmark results: time vs N, peak memory vs N, maximum batch per implementation.

    python -m benchmarks.plot [--results-dir benchmarks/results] [--run RUN_ID]
    python -m benchmarks.plot --markdown cpu     # the latest CPU run as Markdown tables (README)

Reads the CSV files the suites append to (contrastive.csv, logsumexp.csv,
similarity.csv, max_batch.csv, max_batch_trials.csv) and draws, for the
latest run on each device type (or the run given), next to them:

- ``<op>_time_<device>.png``: forward + backward median time against N (log-log),
  20-80% quantiles as error bars, one line per implementation, the matmul
  floor dashed; one panel per (dtype, D);
- ``<op>_memory_<device>.png``: peak memory (inputs + gradients + workspace)
  against N, same layout: quadratic for the materializing paths, linear for
  the tiled ones;
- ``max_batch_<device>.png``: the largest N that fit the memory budget per
  implementation (hatched: a lower bound, the search stopped on time), and
  the peak memory of every search trial against N with the budget line.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from benchmarks import common

OPS = {"contrastive": "contrastive_loss", "logsumexp": "similarity_logsumexp",
       "similarity": "normalized_similarity", "siglip": "siglip_loss"}
FLOOR = "matmul floor"


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None


def latest_runs(rows: list[dict]) -> dict[str, str]:
    """{device type: the run id of its latest run} (by the rows' dates)."""
    latest: dict[str, tuple[str, str]] = {}
    for row in rows:
        device = row.get("device_type") or "unknown"
        stamp = (row.get("date") or "", row.get("run_id") or "")
        if device not in latest or stamp > latest[device]:
            latest[device] = stamp
    return {device: run for device, (_, run) in latest.items()}


def _style(impl: str, impls: list[str]):
    import matplotlib.pyplot as plt

    if impl == FLOOR:
        return {"color": "black", "linestyle": "--", "marker": ""}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>ph*"
    i = impls.index(impl)
    return {"color": colors[i % len(colors)], "marker": markers[i % len(markers)], "linestyle": "-"}


def _title(rows: list[dict]) -> str:
    row = rows[0]
    return f"{row.get('device')}, torch {row.get('torch')}, {row.get('date', '')[:10]}, {row.get('git_sha')}"


def plot_op(op: str, rows: list[dict], device: str, folder: Path) -> list[Path]:
    """Time and memory against N for one op and one run; returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and _num(r.get("total_median_ms"))]
    groups = sorted({(r["dtype"], int(r["d"])) for r in ok if r["impl"] != "matmul peak"})
    if not groups:
        return []
    impls = []
    for r in ok:
        if r["impl"] not in impls and r["impl"] != "matmul peak":
            impls.append(r["impl"])
    written = []
    for metric, label, fname in (("total_median_ms", "forward + backward, median ms", "time"),
                                 ("peak_mib", "peak memory, MiB (inputs + grads + workspace)", "memory")):
        fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.4), squeeze=False)
        for ax, (dtype, d) in zip(axes[0], groups):
            for impl in impls:
                if metric == "peak_mib" and impl == FLOOR:
                    continue
                pts = sorted((int(r["n"]), r) for r in ok
                             if r["impl"] == impl and r["dtype"] == dtype and int(r["d"]) == d
                             and _num(r.get(metric)) is not None)
                if not pts:
                    continue
                xs = [n for n, _ in pts]
                ys = [_num(r[metric]) for _, r in pts]
                style = _style(impl, impls)
                if metric == "total_median_ms" and impl != FLOOR:
                    lo = [y - (_num(r.get("total_q20_ms")) or y) for y, (_, r) in zip(ys, pts)]
                    hi = [(_num(r.get("total_q80_ms")) or y) - y for y, (_, r) in zip(ys, pts)]
                    ax.errorbar(xs, ys, yerr=[lo, hi], label=impl, capsize=3, **style)
                else:
                    ax.plot(xs, ys, label=impl, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (batch)")
            ax.set_ylabel(label)
            ax.set_title(f"{dtype}, D = {d}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{OPS.get(op, op)}, {fname}\n{_title(ok)}", fontsize=9)
        fig.tight_layout()
        path = folder / f"{op}_{fname}_{device}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_max_batch(rows: list[dict], trials: list[dict], device: str, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if _num(r.get("max_n"))]
    if not rows:
        return []
    fig, (bars, mem) = plt.subplots(1, 2, figsize=(12, 4.6))
    names = [r["impl"] for r in rows]
    values = [_num(r["max_n"]) for r in rows]
    lower = [r.get("limited_by") in ("time", "max_n") for r in rows]
    y = range(len(rows))
    for i, (value, is_lower) in enumerate(zip(values, lower)):
        bars.barh(i, value, color="tab:gray" if is_lower else "tab:blue", hatch="//" if is_lower else None,
                  edgecolor="black")
        bars.text(value, i, f" {'>=' if is_lower else ''}{int(value)}", va="center", fontsize=8)
    bars.set_yticks(list(y))
    bars.set_yticklabels(names)
    bars.invert_yaxis()
    bars.set_xscale("log", base=2)
    budget = _num(rows[0].get("memory_budget_mib")) or 0
    bars.set_xlabel("largest N that fits (hatched: a lower bound, the search stopped on time or size)")
    amount = f"{budget / 1024:g} GiB" if budget >= 1024 else f"{budget:g} MiB"
    bars.set_title(f"max batch within {amount}, D = {rows[0]['d']}, {rows[0]['dtype']}")
    impls = []
    for t in trials:
        if t["impl"] not in impls:
            impls.append(t["impl"])
    for impl in impls:
        pts = sorted((int(t["n"]), _num(t.get("peak_mib"))) for t in trials
                     if t["impl"] == impl and _num(t.get("peak_mib")) is not None)
        if pts:
            mem.plot([p[0] for p in pts], [p[1] for p in pts], label=impl, **_style(impl, impls))
    if budget:
        mem.axhline(budget, color="red", linestyle=":", label="budget")
    mem.set_xscale("log", base=2)
    mem.set_yscale("log")
    mem.set_xlabel("N (batch)")
    mem.set_ylabel("peak memory of one fwd+bwd, MiB")
    mem.set_title("search trials")
    mem.grid(True, which="both", alpha=0.3)
    mem.legend(fontsize=8)
    fig.suptitle(f"maximum batch\n{_title(rows)}", fontsize=9)
    fig.tight_layout()
    path = folder / f"max_batch_{device}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_all(folder: Path | None = None, run_id: str | None = None) -> list[Path]:
    """Draw every plot for ``run_id`` (default: the latest run per device type) from the
    CSV files in ``folder`` (default: the results folder); returns the PNGs written."""
    folder = Path(folder) if folder is not None else common.results_dir()
    written: list[Path] = []
    for op in OPS:
        rows = _read(folder / f"{op}.csv")
        runs = {"": run_id} if run_id else latest_runs(rows)
        for _, run in runs.items():
            selected = [r for r in rows if r.get("run_id") == run]
            if selected:
                written += plot_op(op, selected, selected[0].get("device_type") or "unknown", folder)
    summaries, trials = _read(folder / "max_batch.csv"), _read(folder / "max_batch_trials.csv")
    runs = {"": run_id} if run_id else latest_runs(summaries)
    for _, run in runs.items():
        selected = [r for r in summaries if r.get("run_id") == run]
        if selected:
            written += plot_max_batch(selected, [t for t in trials if t.get("run_id") == run],
                                      selected[0].get("device_type") or "unknown", folder)
    return written


def _fmt(value, digits: int = 3) -> str:
    number = _num(value)
    if number is None:
        return ""
    return f"{number:.{digits}g}" if abs(number) < 10 ** digits else f"{number:.0f}"


def markdown(folder: Path | None = None, device: str = "cpu") -> str:
    """Markdown tables of the latest run on ``device`` (for the README's Results)."""
    folder = Path(folder) if folder is not None else common.results_dir()
    rows = _read(folder / "contrastive.csv")
    run = latest_runs(rows).get(device)
    out = []
    selected = [r for r in rows if r.get("run_id") == run and r["impl"] != "matmul peak"]
    if selected:
        first = selected[0]
        out.append(f"contrastive_loss forward + backward, {first['device']}, torch {first['torch']}, "
                   f"{first['date'][:10]}, {first['git_sha']} (run {run}):\n")
        out.append("| impl | N | D | dtype | fwd ms | bwd ms | total ms [q20, q80] | TFLOP/s | % mm peak "
                   "| x floor | vs naive | peak MiB | extra MiB |")
        out.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in selected:
            if r.get("status") != "ok":
                out.append(f"| {r['impl']} | {r['n']} | {r['d']} | {r['dtype']} | {r.get('status')}: "
                           f"{r.get('error', '')} |||||||||")
                continue
            total = (f"{_fmt(r.get('total_median_ms'))} [{_fmt(r.get('total_q20_ms'))}, "
                     f"{_fmt(r.get('total_q80_ms'))}]" if r.get("total_q20_ms") else _fmt(r.get("total_median_ms")))
            out.append(f"| {r['impl']} | {r['n']} | {r['d']} | {r['dtype']} | {_fmt(r.get('fwd_median_ms'))} | "
                       f"{_fmt(r.get('bwd_median_ms'))} | {total} | {_fmt(r.get('tflops'))} | "
                       f"{_fmt(r.get('pct_of_mm_peak'), 2)} | {_fmt(r.get('x_floor'))} | "
                       f"{_fmt(r.get('speedup_vs_naive'))} | {_fmt(r.get('peak_mib'))} | {_fmt(r.get('extra_mib'))} |")
    summaries = _read(folder / "max_batch.csv")
    run = latest_runs(summaries).get(device)
    selected = [r for r in summaries if r.get("run_id") == run]
    if selected:
        first = selected[0]
        budget = _num(first.get("memory_budget_mib")) or 0
        out.append(f"\nMaximum batch within {budget / 1024:g} GiB, D = {first['d']}, {first['dtype']} "
                   f"(run {run}):\n")
        out.append("| impl | max N | limited by | first N that did not fit | peak MiB at max N | step s at max N |")
        out.append("|---|---:|---|---:|---:|---:|")
        for r in selected:
            bound = ">=" if r.get("limited_by") in ("time", "max_n") else ""
            out.append(f"| {r['impl']} | {bound}{r.get('max_n') or 'none'} | {r.get('limited_by')} | "
                       f"{r.get('first_failing_n') or ''} | {_fmt(r.get('peak_mib_at_max'))} | "
                       f"{_fmt(r.get('step_s_at_max'))} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--run", help="the run id to draw (default: the latest per device type)")
    parser.add_argument("--markdown", metavar="DEVICE", help="print the latest run on DEVICE (cpu, cuda) "
                                                             "as Markdown tables instead of drawing")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(args.results_dir, args.markdown))
        return
    for path in plot_all(args.results_dir, args.run):
        print(path)


if __name__ == "__main__":
    main()
