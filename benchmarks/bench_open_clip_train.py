"""Memory and time of open_clip's trainer (open_clip_train) with its own loss
and patched with mmkernels' (``python -m mmkernels.integrations.open_clip_train``),
CPU, fp32, at a batch where open_clip's loss needs more memory than the encoders.

    python -m benchmarks.bench_open_clip_train [--batch 8192] [--steps 3] [--siglip]

Each run is a fresh process training a tiny CLIP (one-layer towers, 16 x 16
images, 8 tokens, embed_dim 64) on ``steps`` batches of random images with
distinct captions (``--dataset-type csv``, the pairs of
tests/open_clip_train_worker.py). Global module hooks read the resident
memory in every step:

- "encoders MiB": what the towers' forward added (VmRSS at the loss call
  minus VmRSS at the model call): the activations they keep for backward;
- "loss step MiB": the peak (VmHWM, reset at the loss call) from the loss
  call to the optimizer step, minus VmRSS at the loss call: the loss's
  forward and the whole backward, encoders' included (the same in both runs);
- "step s": the model call to the optimizer step (the median step);
- "process peak MiB": the run's ru_maxrss.

The memory of the largest step of each run is reported. glibc's mmap threshold is fixed at
128 KiB (``MALLOC_MMAP_THRESHOLD_``), as in bench_distributed, so that RSS
tracks live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common

MODULE = "benchmarks.bench_open_clip_train"
MODEL = "mmk-bench-clip"
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}
MMAP_THRESHOLD = 128 * 1024


def _worker():
    sys.path.insert(0, str(common.ROOT / "tests"))
    import open_clip_train_worker

    return open_clip_train_worker


# --- child: one training run ----------------------------------------------------------

def child_main(mode: str, config_dir: str, out: str, argv: list[str]) -> None:
    import open_clip

    import mmkernels

    open_clip.add_model_config(config_dir)
    losses = (open_clip.loss.ClipLoss, open_clip.loss.SigLipLoss, mmkernels.ClipLoss,
              mmkernels.SigLipLoss)
    steps, current = [], {}

    def before(module, args):
        if isinstance(module, (open_clip.CLIP, open_clip.CustomTextCLIP)):
            current.update(model_rss=common.rss_mib(), start=time.perf_counter())
        elif isinstance(module, losses):
            current.update(loss_rss=common.rss_mib(), loss_type=type(module).__module__)
            common.reset_peak_rss()

    def optimizer_step(optimizer, args, kwargs):
        steps.append({"encoders_mib": current["loss_rss"] - current["model_rss"],
                      "loss_step_mib": common.rss_mib("VmHWM") - current["loss_rss"],
                      "step_s": time.perf_counter() - current["start"],
                      "loss": current["loss_type"]})

    torch.nn.modules.module.register_module_forward_pre_hook(before)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(optimizer_step)
    if mode == "patched":
        from mmkernels.integrations.open_clip_train import main
    else:
        from open_clip_train.main import main
    code = main(argv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"code": code, "steps": steps, "process_peak_mib": peak,
                                     "threads": torch.get_num_threads()}))


# --- parent ------------------------------------------------------------------------------

def run(mode: str, root: Path, csv: Path, batch: int, extra: list[str]) -> dict:
    worker = _worker()
    out = root / f"{mode}.json"
    argv = worker.trainer_args(csv, root / "logs", mode, batch) + extra
    argv[argv.index("--model") + 1] = MODEL
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               PYTHONPATH=os.pathsep.join(filter(None, [str(common.ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", MODULE, "--child", mode, str(root / "configs"),
                           str(out), "--", *argv], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: the run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    if result["code"] not in (None, 0) or not result["steps"]:
        raise RuntimeError(f"{mode}: the trainer returned {result['code']} after "
                           f"{len(result['steps'])} steps")
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        mode, config_dir, out, sep, *rest = argv[1:]
        assert sep == "--"
        return child_main(mode, config_dir, out, rest)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--siglip", action="store_true")
    args = parser.parse_args(argv)
    worker = _worker()
    with tempfile.TemporaryDirectory(prefix="bench_open_clip_train") as tmp:
        root = Path(tmp)
        (root / "configs").mkdir()
        (root / "configs" / f"{MODEL}.json").write_text(json.dumps(CONFIG))
        csv = worker.write_dataset(root / "pairs", args.steps * args.batch, size=16)
        print(f"open_clip_train, {MODEL} (embed_dim {CONFIG['embed_dim']}), batch {args.batch}, "
              f"{args.steps} steps, fp32, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, "
              f"{'SigLIP' if args.siglip else 'CLIP'} loss")
        print(f"{'run':8} {'loss module':16} {'encoders MiB':>13} {'loss step MiB':>14} "
              f"{'step s':>7} {'process peak MiB':>17}")
        for mode in ("plain", "patched"):
            result = run(mode, root, csv, args.batch, ["--siglip"] if args.siglip else [])
            steps = result["steps"]
            print(f"{mode:8} {steps[0]['loss']:16} {max(s['encoders_mib'] for s in steps):13.0f} "
                  f"{max(s['loss_step_mib'] for s in steps):14.0f} "
                  f"{sorted(s['step_s'] for s in steps)[len(steps) // 2]:7.2f} "
                  f"{result['process_peak_mib']:17.0f}")


if __name__ == "__main__":
    main()
