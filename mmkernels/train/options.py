"""The trainer's command line: the parser, and the checks of its arguments."""

from __future__ import annotations

import argparse
import ast

from mmkernels import backends
from mmkernels.models import list_clip_configs

# Arguments that change the result: a resumed run must repeat them.
RESULT_ARGS = ("model", "model_arg", "hf_model", "data", "batch_size", "steps", "lr", "wd", "warmup", "beta1",
               "beta2", "eps", "grad_clip", "seed", "tokenizer", "image_key", "caption_key",
               "separator", "synthetic_size", "data_seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmkernels.train",
        description="Train a CLIP with the mmkernels contrastive loss (gradient caching, "
                    "exact resume). Default: the tiny model on the built-in synthetic data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list_clip_configs(), help="CLIP config")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. vision_layers=2, dropout=0.1")
    g.add_argument("--hf-model", default=None, metavar="DIR",
                   help="fine-tune the transformers CLIPModel or SiglipModel saved in DIR "
                        "(offline), with its processor; replaces --model and --tokenizer, "
                        "and the result is saved to OUTPUT/hf with save_pretrained")
    g.add_argument("--tokenizer", default="hash",
                   help="'hash' (self-contained), 'clip-bpe', 'hf:NAME_OR_PATH' or 'module:attr'")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (built in) or a CSV/TSV/JSONL file of image paths and captions")
    g.add_argument("--val-data", default="auto",
                   help="evaluation data: 'auto' (the synthetic val split when --data is synthetic, "
                        "else none), 'none', 'synthetic' or a file")
    g.add_argument("--val-size", type=int, default=1000, help="evaluation pairs (at most)")
    g.add_argument("--image-key", default=None, help="image path column / key (CSV: filepath, JSONL: image)")
    g.add_argument("--caption-key", default=None, help="caption column / key (CSV: title, JSONL: caption)")
    g.add_argument("--separator", default=None, help="CSV separator (default from the extension)")
    g.add_argument("--synthetic-size", type=int, default=None, help="items of the synthetic train split")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    g.add_argument("--workers", type=int, default=0, help="data loader processes (0: load in the main process)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=256, help="contrastive batch (global, all ranks)")
    g.add_argument("--micro-batch", type=int, default=None,
                   help="encoder chunk for gradient caching (default: the batch size, no caching)")
    g.add_argument("--loss", default="auto", choices=("auto",) + backends.BACKENDS,
                   help="mmkernels backend of the contrastive loss ('naive' materializes N x N)")
    g.add_argument("--steps", type=int, default=500, help="optimizer steps")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 2e-3; 1e-5 with --hf-model)")
    g.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    g.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps, at least 25; a shorter run "
                        "warms up throughout)")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.98)
    g.add_argument("--eps", type=float, default=1e-6)
    g.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (none by default)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialization and the data order")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="encoder precision: auto is bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--fsdp", action="store_true",
                   help="with torchrun: shard parameters, gradients and optimizer state over the "
                        "ranks (FSDP2 fully_shard) instead of replicating them (DDP)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's choice, one per core)")
    g = p.add_argument_group("outputs")
    g.add_argument("--output", default=None, help="run folder (default: runs/<model>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from OUTPUT/last.pt (or the given checkpoint); starts afresh "
                        "when there is none yet")
    g.add_argument("--log-every", type=int, default=10, help="steps between metrics records")
    g.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations (default: --steps / 10; 0: at the end only)")
    g.add_argument("--save-every", type=int, default=None,
                   help="steps between checkpoints (default: as --eval-every; 0: at the end only)")
    g.add_argument("--no-plot", action="store_true", help="do not draw curves.png")
    return p


def parse_model_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model-arg: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def check_args(args) -> None:
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size: a contrastive batch needs at least 2 pairs, got {args.batch_size}")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise ValueError(f"--micro-batch: expected a positive number, got {args.micro_batch}")
    if args.lr is not None and args.lr <= 0:
        raise ValueError(f"--lr: expected a positive learning rate, got {args.lr}")
    if getattr(args, "fsdp", False):
        for name, value in (("--hf-model", args.hf_model), ("--grad-clip", args.grad_clip)):
            if value:
                raise ValueError(f"--fsdp: not with {name} (not supported yet)")
    if args.warmup is not None and not 0 <= args.warmup <= args.steps:
        raise ValueError(f"--warmup: expected 0 .. --steps ({args.steps}), got {args.warmup}")
