"""One run of open_clip's trainer (open_clip_train) on a tiny CLIP, for
tests/test_open_clip_train.py: in the test's process (:func:`train`) or as a
torchrun process of its own:

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/open_clip_train_worker.py OUT_DIR CONFIG_DIR RUNS_JSON

RUNS_JSON lists the runs, one after another in the same processes:
``[{"name": ..., "mode": "plain" or "patched", "argv": [open_clip_train args]}, ...]``.
For each, every process writes OUT_DIR/<name>-rank<r>.json (the loss of every
step, as its loss module returned it, and the class that computed it) and
rank 0 OUT_DIR/<name>-initial.pt (the parameters before the first step).
``patched`` runs ``python -m mmkernels.integrations.open_clip_train``'s code
(runpy), ``plain`` ``python -m open_clip_train.main``'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import torch

MODEL = "mmk-tiny-clip"
# A ViT and text transformer of one layer each, 32 x 32 images (16 patches):
# the trainer's every step runs in milliseconds on one core.
CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


def write_model_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{MODEL}.json").write_text(json.dumps(CONFIG))
    return directory


def write_dataset(directory: Path, pairs: int, size: int = 32, seed: int = 0) -> Path:
    """``pairs`` random RGB images (PNG) and a tab-separated CSV of (filepath,
    title) with a distinct caption each: real pairs, unlike open_clip's
    ``--dataset-type synthetic`` (one blank image and one caption for every
    sample, so its CLIP loss is log(batch) with zero gradients)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ("red", "green", "blue", "yellow", "black", "white")
    rows = ["filepath\ttitle"]
    for i in range(pairs):
        path = directory / f"image{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        rows.append(f"{path}\tpicture {i} of a {colours[i % len(colours)]} square")
    csv = directory / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def trainer_args(csv: Path | None, logs: Path, name: str, batch_size: int = 8,
                 synthetic_samples: int = 24) -> list[str]:
    """open_clip_train arguments for one fp32 CPU epoch over ``csv`` (None:
    open_clip's synthetic dataset of ``synthetic_samples``) with a fixed
    seed; every step logged, the final parameters saved."""
    data = (["--dataset-type", "synthetic", "--train-num-samples", str(synthetic_samples)]
            if csv is None else ["--train-data", str(csv), "--dataset-type", "csv"])
    return ["--model", MODEL, *data,
            "--batch-size", str(batch_size), "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--warmup", "1",
            "--seed", "0", "--log-every-n-steps", "1", "--logs", str(logs), "--name", name]


class Recorder:
    """Global module hooks: the value of every loss call (the module that
    returns a dict with "contrastive_loss", as open_clip's losses and
    mmkernels' do with ``output_dict=True``) and the model's parameters
    before its first forward."""

    def __init__(self):
        self.losses: list[float] = []
        self.loss_types: set[str] = set()
        self.initial: dict | None = None

    def _before(self, module, args):
        import open_clip

        if self.initial is None and isinstance(module, (open_clip.CLIP, open_clip.CustomTextCLIP)):
            self.initial = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def _after(self, module, args, output):
        if isinstance(output, dict) and "contrastive_loss" in output:
            self.losses.append(sum(v.item() for v in output.values()))
            self.loss_types.add(f"{type(module).__module__}.{type(module).__qualname__}")

    @contextlib.contextmanager
    def installed(self):
        hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._before),
                 torch.nn.modules.module.register_module_forward_hook(self._after)]
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()


@contextlib.contextmanager
def cpu_ddp():
    """open_clip_train wraps the model as ``DistributedDataParallel(model,
    device_ids=[device])``, which torch refuses for a CPU device; drop the
    device_ids there (a CPU module takes none). Both runs get it."""
    original = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(original):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP
    try:
        yield
    finally:
        torch.nn.parallel.DistributedDataParallel = original


@contextlib.contextmanager
def trainer_logging():
    """The trainer adds handlers to the root logger and sets every logger to
    INFO (open_clip_train.logger.setup_logging): undo both afterwards, so runs
    in one process write only their own log files."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
        for name, logger in logging.root.manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


def train(argv: list[str], patched: bool) -> Recorder:
    """Run the trainer on ``argv`` in this process; ``patched`` through
    ``mmkernels.integrations.open_clip_train.main``, else open_clip_train's own."""
    recorder = Recorder()
    with recorder.installed(), trainer_logging(), cpu_ddp():
        if patched:
            from mmkernels.integrations import open_clip_train

            code = open_clip_train.main(argv)
        else:
            from open_clip_train.main import main

            code = main(argv)
    if code not in (None, 0):
        raise RuntimeError(f"open_clip_train returned {code} for {argv}")
    return recorder


def run_as_main(name: str, mode: str, argv: list[str], out: Path) -> None:
    """One run, the trainer's module run as ``python -m`` runs it: for
    "patched", ``mmkernels.integrations.open_clip_train``; for "plain",
    ``open_clip_train.main``. Writes OUT/<name>-rank<r>.json and, on rank 0,
    OUT/<name>-initial.pt."""
    rank = int(os.environ.get("RANK", "0"))
    recorder = Recorder()
    module = {"patched": "mmkernels.integrations.open_clip_train",
              "plain": "open_clip_train.main"}[mode]
    with recorder.installed(), trainer_logging(), cpu_ddp():
        sys.argv = [module, *argv]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            if stop.code not in (None, 0):
                raise
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(
        {"losses": recorder.losses, "loss_types": sorted(recorder.loss_types)}))
    if rank == 0:
        torch.save(recorder.initial, out / f"{name}-initial.pt")


@contextlib.contextmanager
def one_process_group():
    """Each run's trainer calls ``torch.distributed.init_process_group``; the
    first call makes the group and the later ones keep it. (A group destroyed
    and made again under the same torchrun store reuses the first group's
    keys, and a rank can read the other's old address: a refused connection.)"""
    import torch.distributed as dist

    original = dist.init_process_group

    def init_once(*args, **kwargs):
        if not dist.is_initialized():
            original(*args, **kwargs)

    dist.init_process_group = init_once
    try:
        yield
    finally:
        dist.init_process_group = original
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    out, config, spec = sys.argv[1:]
    import open_clip

    open_clip.add_model_config(config)
    with one_process_group():
        for run in json.loads(Path(spec).read_text()):
            run_as_main(run["name"], run["mode"], run["argv"], Path(out))


if __name__ == "__main__":
    main()
