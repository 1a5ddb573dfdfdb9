"""The trainer's files and signals: checkpoints, the metrics log, the curves
PNG, and the preemption flag set by SIGTERM / SIGINT."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

METRICS = "metrics.jsonl"
CHECKPOINT = "last.pt"
CURVES = "curves.png"


# --- checkpoints ----------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write leaves the old file)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    # weights_only: tensors, numbers, strings and containers only (no pickled code).
    return torch.load(path, map_location="cpu", weights_only=True)


# --- metrics ----------------------------------------------------------------------

class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step or evaluation."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.exists():
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            with open(self.path, "w") as f:
                f.writelines(kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict], path: Path, title: str = "") -> bool:
    """Loss and recall@1 (and zero-shot accuracy) against the step, as a PNG.
    Returns False (and draws nothing) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("contrastive loss")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    steps = [r["step"] for r in evals]
    for key, label in (("i2t_recall@1", "image-to-text R@1"), ("t2i_recall@1", "text-to-image R@1")):
        ax_eval.plot(steps, [r.get(key) for r in evals], marker="o", ms=3, label=label)
    zeroshot = sorted({k for r in evals for k in r if k.startswith("zeroshot_")})
    for key in zeroshot:
        ax_eval.plot(steps, [r.get(key) for r in evals], ls="--", lw=1, label=key.replace("_", " "))
    if evals and "chance_recall@1" in evals[-1]:
        ax_eval.axhline(evals[-1]["chance_recall@1"], color="grey", lw=0.8, ls=":", label="chance R@1")
    ax_eval.set_xlabel("step")
    ax_eval.set_ylabel("evaluation")
    ax_eval.set_ylim(0, 1)
    ax_eval.grid(alpha=0.3)
    ax_eval.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- preemption -----------------------------------------------------------------

class StopSignal:
    """SIGTERM / SIGINT set a flag that the loop reads after each step; a second
    signal stops at once (KeyboardInterrupt, nothing saved)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without saving")
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing the step in flight, then saving",
              file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)


def ignore_stop_signals(*_):
    """worker_init_fn of data loader workers: the main process decides when to stop."""
    for sig in StopSignal.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
