"""Data-parallel training over torch.distributed (launched by torchrun).

Each of the W processes encodes its own slice of the global batch. The loss
is that of the whole global batch, ``mmkernels.distributed.contrastive_loss``
(ring strategy: per-rank memory O(local_N * D); the gather strategy for the
naive backend). A rank's embedding gradients are those of open_clip's
``ClipLoss(gather_with_grad=True)`` (W times the gradient of the global loss
with respect to its own embeddings), so averaging the parameter gradients
over the ranks gives each rank exactly the single-process full-batch
gradient: torch's ``DistributedDataParallel`` (:func:`wrap`) does it, in
buckets overlapped with the backward.

With gradient caching (mmkernels/train/step.py) a step runs several
forward/backward passes of micro-batches; all but the last run under
``no_sync()``, so DDP all-reduces once per step, in the last one's backward.
The logit scale gets its gradient from the loss, outside the encoders'
backward; the step hands that gradient to the last micro-batch's backward
through ``model.scale()`` (which the CLIP's forward returns), so DDP averages
it with the towers' gradients, in the same buckets. (Every rank holds the
same dL/dscale of the global loss, up to round-off; the average keeps the
ranks' parameters identical.) DDP also broadcasts rank 0's parameters when
it wraps the model, so every rank starts from the same weights.

``--fsdp`` (:func:`shard`) shards the parameters, gradients and optimizer
state over the ranks with FSDP2's ``fully_shard`` instead, for towers that do
not fit one device. It composes with gradient caching: the micro-batches but
the last run with ``set_requires_gradient_sync(False)``, so gradients are
reduce-scattered once per step. FSDP2 cannot shard the 0-dim logit scale:
it stays whole on every rank, outside FSDP, and its gradient is averaged by
one explicit all-reduce after the backward (:func:`average_scalars`).
"""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mmkernels.distributed import contrastive_loss


def world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> None:
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def loss_function(backend: str):
    """The distributed loss to train with, and a name for it."""
    # The ring passes tiles between ranks; the naive backend materializes the
    # whole matrix, which only the gather strategy has.
    strategy = "gather" if backend == "naive" else "ring"
    return (partial(contrastive_loss, strategy=strategy, backend=backend),
            f"mmkernels.distributed ({strategy}, {backend})")


def wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` in DistributedDataParallel on ``device`` (the process group initialized)."""
    # Every parameter gets its gradient in each synchronized backward (the
    # scale's through the forward's output), so no search for unused ones.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``model`` sharded in place by FSDP2 (``fully_shard``) for ``--fsdp``:
    each block of each tower, each tower, then the root. Returns the scalar
    parameters it leaves out (the logit scale): FSDP2 cannot shard a 0-dim
    tensor, so they stay whole on every rank and :func:`average_scalars`
    averages their gradients after the step's backward.

    The towers are units of their own so that ``encode_image`` /
    ``encode_text`` (the evaluation's calls, which bypass the root's forward)
    gather their parameters; the root then manages none. Every rank must run
    every forward (collective): the trainer evaluates on every rank.
    """
    from torch.distributed.fsdp import fully_shard

    scalars = [p for p in model.parameters() if p.ndim == 0]
    ignored = set(scalars)
    towers = [child for child in model.children() if any(True for _ in child.parameters())]
    for tower in towers:
        for module in tower.modules():
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    fully_shard(block, ignored_params=ignored)
        fully_shard(tower, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return scalars


def average_scalars(params: list[torch.nn.Parameter]) -> None:
    """All-reduce mean of the gradients of ``params`` (one collective)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.stack(grads)
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        for g, value in zip(grads, flat):
            g.copy_(value)


def all_min(value: int, device: torch.device) -> int:
    """The smallest of the ranks' values."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def any_true(flag: bool, device: torch.device) -> bool:
    """Whether any rank's flag is set."""
    t = torch.tensor([int(flag)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)
