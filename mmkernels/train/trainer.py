"""The training run: model, data, optimizer, the loop with its checkpoints,
evaluations and stop signals, and the console entry point :func:`main`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch

import mmkernels
from mmkernels import backends
from mmkernels.data import BatchFetcher, batches, load_items, open_dataset
from mmkernels.models import create_clip, get_tokenizer
from mmkernels.train import hf, parallel
from mmkernels.train.evaluation import evaluate
from mmkernels.train.files import (CHECKPOINT, CURVES, METRICS, MetricsLog, StopSignal,
                                   ignore_stop_signals, load_checkpoint, plot_curves,
                                   save_checkpoint)
from mmkernels.train.options import RESULT_ARGS, build_parser, check_args, parse_model_args
from mmkernels.train.step import contrastive_step, rng_state, set_rng_state


class DataError(RuntimeError):
    """A batch could not be formed from the data."""


# --- pieces -----------------------------------------------------------------------

# Warmup: 5% of the run, but never fewer than 25 steps. Adam moves every
# parameter by about lr per step whatever its gradient's size, and the tiny
# model's embedding tables start at std 0.01-0.02: three steps at the peak lr
# 2e-3 (the 5% of a 60-step run) shift them by a good part of their scale in
# one shared direction, every embedding ends up alike and the loss sits at
# log(batch) from then on (the gradients shrink ~500x while Adam's second
# moments, beta2 0.98, still remember the large first ones). 25 steps is the
# 5% of the default 500, which learns; a run shorter than the floor warms up
# for all its steps and never reaches the peak lr.
WARMUP_FLOOR = 25
# The peak learning rate: training from scratch, and fine-tuning a pretrained
# Hugging Face CLIP (--hf-model), whose weights a from-scratch rate would wreck.
DEFAULT_LR = 2e-3
HF_DEFAULT_LR = 1e-5
# The folder of the run where --hf-model's result is saved (save_pretrained).
HF_FOLDER = "hf"


def default_warmup(steps: int) -> int:
    """The warmup of a run of ``steps`` steps without ``--warmup``: 5% of it, at least 25."""
    return max(steps // 20, WARMUP_FLOOR)


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to 0 at
    ``total`` (a warmup longer than the run ends it below 1)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class CollapseWatch:
    """Detects a collapsed run: once warmup is over, the loss stays at log(N),
    that of a uniform guess over the N pairs of the batch, which is where a
    contrastive loss lands when every embedding is alike (and a learning run
    has left). :meth:`update` returns the warning, once, when the loss has
    been within ``rtol * log(N)`` of log(N) for ``patience`` consecutive steps
    after warmup (fewer when the run has fewer left, but at least 3), and a
    note if the loss leaves log(N) afterwards (a small model can sit there a
    while before it learns). ``collapsed``: whether the run is collapsed now."""

    def __init__(self, warmup: int, total: int, patience: int = 10, rtol: float = 0.01):
        self.warmup = warmup
        self.patience = max(3, min(patience, (total - warmup) // 2))
        self.rtol = rtol
        self.count = 0
        self.warned_at: int | None = None
        self.collapsed = False

    def update(self, step: int, loss: float, pairs: int) -> str | None:
        """Record the loss of ``step`` (1-based) over a batch of ``pairs``; the
        warning the first time the run is found collapsed, the note when it
        leaves the collapse, else None."""
        uniform = math.log(pairs)
        if step <= self.warmup or abs(loss - uniform) > self.rtol * uniform:
            self.count = 0
            if self.collapsed and loss < uniform:
                self.collapsed = False
                return (f"note: the loss has left log({pairs}) at step {step} ({loss:.3f}): "
                        "the run is learning after all")
            return None
        self.count += 1
        if self.count < self.patience or self.warned_at is not None:
            return None
        self.warned_at = step
        self.collapsed = True
        return (f"warning: the loss has stayed at log({pairs}) = {uniform:.3f}, that of a uniform "
                f"guess over the batch, for {self.count} steps after warmup (steps {step - self.count + 1}"
                f"..{step}): the run has collapsed (every embedding alike) and is not learning; a "
                "longer --warmup or a smaller --lr avoids it")


def make_optimizer(model, args):
    """AdamW; weight decay on matrices only (not on gains, biases, the logit scale), as open_clip."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=DEFAULT_LR if args.lr is None else args.lr,
                             betas=(args.beta1, args.beta2), eps=args.eps)


def _log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _eval_set(args, model, tokenizer, wrap=lambda dataset: dataset):
    """Evaluation images, tokens, groups and zero-shot tasks, or None
    (``wrap``: what the dataset goes through, e.g. a Hugging Face processor)."""
    spec = args.val_data
    if spec == "auto":
        spec = "synthetic" if args.data == "synthetic" else "none"
    if spec == "none":
        return None
    dataset = wrap(open_dataset(spec, image_size=model.image_size, train=False, seed=args.data_seed,
                                synthetic_size=args.val_size, image_key=args.image_key,
                                caption_key=args.caption_key, separator=args.separator))
    indices = list(range(min(args.val_size, len(dataset))))
    images, tokens, kept, skipped = load_items(dataset, tokenizer, indices)
    if skipped:
        _log(f"evaluation data: skipped {len(skipped)} of {len(indices)} items (first: {skipped[0][1]})")
    keys = [dataset.group(i) for i in kept]
    ids = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    eval_set = {"images": images, "tokens": tokens, "groups": torch.tensor([ids[k] for k in keys])}
    if hasattr(dataset, "zeroshot_tasks"):
        eval_set["zeroshot"] = dataset.zeroshot_tasks(kept)
    return eval_set


def _check_tokenizer(tokenizer, model) -> None:
    probe = tokenizer(["a probe caption"])
    vocab = model.config.text.vocab_size
    if probe.dim() != 2 or probe.shape[1] > model.context_length:
        raise ValueError(f"tokenizer: expected (B, L <= {model.context_length}) token ids, "
                         f"got shape {tuple(probe.shape)}")
    size = getattr(tokenizer, "vocab_size", int(probe.max()) + 1)
    if size > vocab:
        raise ValueError(f"tokenizer: its vocabulary ({size}) is larger than the model's "
                         f"({vocab}); pass --model-arg vocab_size={size}")


# --- the run ----------------------------------------------------------------------

class Trainer:
    """One training run from parsed arguments: ``prepare()`` (output folder,
    resume), then ``run()`` (returns the exit code)."""

    def __init__(self, args):
        check_args(args)
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.rank, self.world_size, local_rank = parallel.world()
        if args.device:
            self.device = torch.device(args.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            parallel.init(self.device)
        bf16 = args.precision == "bf16" or (args.precision == "auto" and self.device.type == "cuda")
        self.precision = "bf16" if bf16 else "fp32"
        self.autocast = (partial(torch.autocast, self.device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext)
        self.is_main = self.rank == 0

        self.name = Path(args.hf_model).name if args.hf_model else args.model
        if args.lr is None:  # from scratch, or fine-tuning a pretrained model
            args.lr = HF_DEFAULT_LR if args.hf_model else DEFAULT_LR
        self.out = Path(args.output or f"runs/{self.name}")
        self.warmup = args.warmup if args.warmup is not None else default_warmup(args.steps)
        self.eval_every = args.eval_every if args.eval_every is not None else max(1, args.steps // 10)
        self.save_every = args.save_every if args.save_every is not None else self.eval_every
        self.micro_batch = args.micro_batch or args.batch_size

        torch.manual_seed(args.seed)
        wrap = lambda dataset: dataset  # noqa: E731
        self.processor = None
        if args.hf_model:
            if args.model_arg:
                raise ValueError("--model-arg: does not apply to --hf-model (its config is in the folder)")
            hf_model, self.processor = hf.load_pretrained(args.hf_model)
            self.model = hf.HFContrastiveModel(hf_model).to(self.device)
            if self.model.kind == "siglip" and self.world_size > 1:
                raise ValueError("--hf-model: a SiglipModel trains on one process here "
                                 "(data-parallel training has the CLIP loss only)")
            self.tokenizer = hf.ProcessorTokenizer(self.processor, self.model.context_length)
            wrap = partial(hf.ProcessorDataset, processor=self.processor)
        else:
            self.model = create_clip(args.model, **parse_model_args(args.model_arg)).to(self.device)
            self.tokenizer = get_tokenizer(args.tokenizer, vocab_size=self.model.config.text.vocab_size,
                                           context_length=self.model.context_length)
            _check_tokenizer(self.tokenizer, self.model)
        if self.world_size > 1:  # one initialization, but each rank its own dropout masks
            torch.manual_seed(args.seed + self.rank)
        self.dataset = wrap(open_dataset(args.data, image_size=self.model.image_size, train=True,
                                         seed=args.data_seed, synthetic_size=args.synthetic_size,
                                         image_key=args.image_key, caption_key=args.caption_key,
                                         separator=args.separator))
        if getattr(self.dataset, "skipped_rows", None):
            _log(f"data: skipped rows of {args.data}: {dict(self.dataset.skipped_rows)}")
        self.fetcher = BatchFetcher(self.dataset, self.tokenizer, args.batch_size, args.seed,
                                    rank=self.rank, world_size=self.world_size)
        self.fsdp = bool(args.fsdp)
        if self.fsdp and self.world_size == 1:
            raise ValueError("--fsdp: shards over the processes of torchrun; this run has one")
        # FSDP's forwards are collective: every rank evaluates (rank 0 writes).
        evaluates = self.is_main or self.fsdp
        self.eval_set = _eval_set(args, self.model, self.tokenizer, wrap) if evaluates else None

        backend = backends.select_backend(args.loss, self.device)  # fails early, naming the backend
        # What a step runs: the model itself, or with several processes the
        # model in DistributedDataParallel (which also broadcasts rank 0's weights).
        self.step_model = self.model
        self.unsharded: list = []  # parameters FSDP leaves whole, averaged by hand
        if self.fsdp:  # in place: self.model is the sharded model
            self.unsharded = parallel.shard(self.model)
            self.loss_fn, self.loss_name = parallel.loss_function(args.loss)
        elif self.world_size > 1:
            self.step_model = parallel.wrap(self.model, self.device)
            self.loss_fn, self.loss_name = parallel.loss_function(args.loss)
        elif args.hf_model:
            self.loss_fn = self.model.loss_function(args.loss)
            self.loss_name = backend
        else:
            self.loss_fn = partial(mmkernels.contrastive_loss, backend=args.loss)
            self.loss_name = backend
        self.optimizer = make_optimizer(self.model, args)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_lambda, warmup=self.warmup, total=args.steps))
        self.metrics = MetricsLog(self.out / METRICS, enabled=self.is_main)
        self.step = 0
        self.skipped = 0
        self.elapsed_before = 0.0
        self.last_eval: dict = {}
        self.pairs = args.batch_size  # of the last step, all ranks
        self.collapse = CollapseWatch(self.warmup, args.steps)

    # -- checkpoints --
    def _result_args(self) -> dict:
        values = {k: getattr(self.args, k) for k in RESULT_ARGS}
        values["warmup"] = self.warmup
        return values

    def _state(self, step: int, rng: dict, elapsed: float) -> dict | None:
        """The checkpoint of the state after ``step`` steps (gathered from every rank)."""
        rngs = [rng]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            torch.distributed.all_gather_object(rngs, rng)
        if self.fsdp:  # the whole tensors, gathered by every rank (collective), kept on CPU
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_model_state_dict,
                                                                 get_optimizer_state_dict)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=options)
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        else:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        if not self.is_main:
            return None
        return {"model": model_state, "optimizer": optimizer_state, "fsdp": self.fsdp,
                "scheduler": self.scheduler.state_dict(), "step": step,
                "data_position": step * self.args.batch_size, "rng": rngs,
                "skipped": self.skipped, "elapsed_s": elapsed, "args": self._result_args(),
                "config": (self.model.config_dict() if self.processor is not None
                           else dataclasses.asdict(self.model.config)),
                "mmkernels": mmkernels.__version__}

    def save(self, step: int, rng: dict, elapsed: float) -> None:
        state = self._state(step, rng, elapsed)
        if state is not None:
            save_checkpoint(self.out / CHECKPOINT, state)

    def restore(self) -> None:
        args = self.args
        path = self.out / CHECKPOINT if args.resume == "auto" else Path(args.resume)
        if not path.exists():
            if args.resume != "auto":
                raise ValueError(f"--resume: no checkpoint at {str(path)!r}")
            _log(f"--resume: no checkpoint at {path} yet; starting from scratch")
            return
        state = load_checkpoint(path)
        saved, now = state.get("args", {}), self._result_args()
        differ = [k for k in RESULT_ARGS if k in saved and saved[k] != now[k]]
        if differ:
            raise ValueError("--resume: the checkpoint was trained with other arguments: " + ", ".join(
                f"--{k.replace('_', '-')} {saved[k]!r} (now {now[k]!r})" for k in differ)
                + "; resume with the same arguments")
        if state.get("fsdp", False) != self.fsdp:  # the optimizer state's layouts differ
            written = "with" if state.get("fsdp") else "without"
            raise ValueError(f"--resume: the checkpoint was written {written} --fsdp; "
                             "resume the same way")
        if self.fsdp:  # every rank holds the whole state and keeps its shards
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_model_state_dict,
                                                                 set_optimizer_state_dict)
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.skipped = state["step"], state.get("skipped", 0)
        self.elapsed_before = state.get("elapsed_s", 0.0)
        rngs = state["rng"]
        if len(rngs) != self.world_size:
            raise ValueError(f"--resume: the checkpoint has the random state of {len(rngs)} processes, "
                             f"this run has {self.world_size}")
        set_rng_state(rngs[self.rank], self.device)
        self.metrics.truncate_after(self.step)
        _log(f"resumed from {path} at step {self.step}")

    # -- evaluation --
    def run_eval(self, step: int) -> None:
        if self.eval_set is not None:
            t0 = time.perf_counter()
            metrics = evaluate(self.model, self.eval_set, self.tokenizer, self.device, self.autocast)
            self.last_eval = {"step": step, **metrics}
            self.metrics.write({"kind": "eval", "step": step, **metrics,
                                "eval_s": round(time.perf_counter() - t0, 3)})
        if self.world_size > 1:
            torch.distributed.barrier()

    # -- one step --
    def train_step(self, batch) -> torch.Tensor:
        n = batch.images.shape[0]
        if self.world_size > 1:  # equal shards: the ranks agree on the smallest
            n = parallel.all_min(n, self.device)
        if batch.skipped:
            self.skipped += len(batch.skipped)
            if self.skipped - len(batch.skipped) < 10:
                for _, reason in batch.skipped[:3]:
                    _log(f"data: skipped an item of step {batch.step}: {reason}")
        if n < 2:
            first = batch.skipped[0][1] if batch.skipped else "no items"
            raise DataError(f"data: only {n} item(s) of the batch of step {batch.step} could be "
                            f"loaded; first error: {first}")
        self.pairs = n * self.world_size
        images = batch.images[:n].to(self.device, non_blocking=True)
        tokens = batch.tokens[:n].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        # With several processes, DDP has averaged the gradients when this returns
        # (FSDP reduce-scattered all but the scalars it leaves whole).
        loss = contrastive_step(self.step_model, images, tokens, self.loss_fn, self.micro_batch,
                                self.autocast)
        if self.unsharded:
            parallel.average_scalars(self.unsharded)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {float(loss)} at step {batch.step}")
        if self.args.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        return loss

    def prepare(self) -> None:
        """Create the output folder; resume, or refuse to overwrite a run."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.args.resume:
            self.restore()
        elif (self.out / CHECKPOINT).exists():
            raise ValueError(f"--output: {str(self.out)!r} already holds a run ({CHECKPOINT}); pass "
                             "--resume to continue it, or choose another folder")
        elif self.is_main and (self.out / METRICS).exists():
            (self.out / METRICS).unlink()

    def run(self) -> int:
        """Train to ``--steps`` (or to a stop signal); returns the exit code."""
        args = self.args
        if self.is_main:
            _log(f"training {self.name} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M "
                 f"parameters) on {args.data}, {self.world_size} process(es){self._parallel_name()} "
                 f"on {self.device}, "
                 f"{self.precision}; batch {args.batch_size}, micro-batch {self.micro_batch}, "
                 f"loss {self.loss_name}; steps {self.step}..{args.steps}; output {self.out}")
        self.model.train()
        start = time.perf_counter()
        elapsed = lambda: self.elapsed_before + time.perf_counter() - start  # noqa: E731
        progress = _progress(args.steps, self.step, enabled=self.is_main)
        window_t, window_n = time.perf_counter(), 0
        stream = batches(self.fetcher, self.step, args.steps, args.workers, ignore_stop_signals)
        with StopSignal() as stop:
            for batch in stream:
                rng_before = rng_state(self.device)
                try:
                    loss = self.train_step(batch)
                except Exception as exc:
                    # Progress is never lost: save the last completed step, then fail. With
                    # several processes only errors that every rank meets together (the
                    # shared batch size, the global loss) can save: saving is collective.
                    if self.world_size == 1 or isinstance(exc, (DataError, FloatingPointError)):
                        self.save(self.step, rng_before, elapsed())
                        _log(f"error at step {self.step + 1}; the state after step {self.step} "
                             f"is saved in {self.out / CHECKPOINT}")
                    raise
                self.optimizer.step()
                self.scheduler.step()
                self.model.clamp_logit_scale_()
                self.step += 1
                window_n += batch.images.shape[0] * self.world_size
                progress.update(1)
                progress.set_postfix(loss=f"{float(loss):.4f}")
                warning = self.collapse.update(self.step, float(loss), self.pairs)
                if warning and self.is_main:
                    _log(warning)
                if self.step % args.log_every == 0 or self.step == args.steps:
                    now = time.perf_counter()
                    self.metrics.write({
                        "kind": "train", "step": self.step, "loss": float(loss),
                        "lr": self.scheduler.get_last_lr()[0],
                        "logit_scale": float(self.model.scale().detach()),
                        "samples_per_s": round(window_n / max(now - window_t, 1e-9), 2),
                        "elapsed_s": round(elapsed(), 3), "skipped": self.skipped})
                    window_t, window_n = now, 0
                if self.eval_every and self.step % self.eval_every == 0 and self.step < args.steps:
                    self.run_eval(self.step)
                if self.save_every and self.step % self.save_every == 0 and self.step < args.steps:
                    self.save(self.step, rng_state(self.device), elapsed())
                stopping = stop.signum is not None
                if self.world_size > 1:
                    stopping = parallel.any_true(stopping, self.device)
                if stopping and self.step < args.steps:
                    self.save(self.step, rng_state(self.device), elapsed())
                    progress.close()
                    _log(f"stopped after step {self.step} of {args.steps}; saved "
                         f"{self.out / CHECKPOINT}; rerun with --resume to continue")
                    return stop.exit_code or 1
        progress.close()
        if self.last_eval.get("step") != self.step:
            self.run_eval(self.step)
        self.save(self.step, rng_state(self.device), elapsed())
        if self.is_main and self.processor is not None:
            self.model.save_pretrained(self.out / HF_FOLDER, self.processor)
        if self.is_main:
            if not args.no_plot and not plot_curves(self.metrics.read(), self.out / CURVES,
                                                    f"{self.name} on {args.data}, batch {args.batch_size}"):
                _log("matplotlib is not installed: no curves.png (pip install 'mmkernels[train]')")
            summary = {**self.last_eval, "step": self.step, "loss": self._last_loss(),
                       "elapsed_s": round(elapsed(), 1), "skipped": self.skipped,
                       "collapsed": self.collapse.collapsed, "output": str(self.out)}
            if self.processor is not None:
                summary["hf_model"] = str(self.out / HF_FOLDER)
            print(json.dumps(summary), flush=True)
        return 0

    def _parallel_name(self) -> str:
        if self.world_size == 1:
            return ""
        return " sharded (FSDP2)" if self.fsdp else " in DDP"

    def _last_loss(self):
        train = [r for r in self.metrics.read() if r.get("kind") == "train"]
        return train[-1]["loss"] if train else None


def _progress(total: int, initial: int, enabled: bool):
    """A tqdm bar on an interactive stderr; a silent stand-in otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        return _NoProgress()
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None)


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``mmkernels-train``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        trainer = Trainer(args)
        trainer.prepare()
    except (ValueError, TypeError, RuntimeError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    try:
        code = trainer.run()
        if trainer.world_size > 1:
            # No rank tears the group down while another still talks to it (a gloo
            # peer that vanishes mid-exchange aborts the other process). Only on
            # success: after an error the other ranks may never arrive.
            torch.distributed.barrier()
        return code
    finally:
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

