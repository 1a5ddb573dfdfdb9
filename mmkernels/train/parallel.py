"""Data-parallel training over torch.distributed (launched by torchrun).

Each of the W processes encodes its own slice of the global batch. The loss
is that of the whole global batch, ``mmkernels.distributed.contrastive_loss``
(ring strategy: per-rank memory O(local_N * D); the gather strategy for the
naive backend). A rank's embedding gradients are those of open_clip's
``ClipLoss(gather_with_grad=True)`` (W times the gradient of the global loss
with respect to its own embeddings), so :func:`average_gradients` (an
all-reduce mean, done once per step after gradient caching has accumulated
every chunk) gives each rank exactly the single-process full-batch gradient.
The model is not wrapped in DistributedDataParallel: its per-backward
hooks would all-reduce once per micro-batch, and the logit scale receives its
gradient outside the encoders' backward passes.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.distributed as dist

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


def broadcast_parameters(model: torch.nn.Module) -> None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def average_gradients(model: torch.nn.Module, bucket_bytes: int = 64 * 2**20) -> None:
    """All-reduce mean of every parameter gradient, in flat buckets."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    world_size = dist.get_world_size()
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat.div_(world_size)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


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
