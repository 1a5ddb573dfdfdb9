"""Loss modules: drop-ins for open_clip's, computed by the tiled kernels."""

from __future__ import annotations

from torch import Tensor, nn

from mmkernels.ops.contrastive import contrastive_loss
from mmkernels.ops.siglip import siglip_loss
from mmkernels.distributed import siglip_loss_distributed


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss``, without the N x N logits.

    Same constructor and ``forward(image_features, text_features, logit_scale,
    logit_bias=None, output_dict=False)`` as open_clip 3.x; the value is
    ``(CE(S, arange(N)) + CE(S.T, arange(N))) / 2`` with
    ``S = logit_scale * image_features @ text_features.T``, computed by
    :func:`mmkernels.contrastive_loss`.

    Args:
        local_loss, gather_with_grad, rank, world_size: open_clip's
            distributed settings. With world_size > 1 (over the default
            torch.distributed process group, whose rank and size they must
            match) the loss and every gradient follow open_clip's for each
            combination of the flags (:func:`mmkernels.distributed.clip_loss`).
        cache_labels: accepted for compatibility; no labels tensor is cached.
        use_horovod: not supported (raises).
        backend: keyword-only, the mmkernels backend ("auto" by default).
        strategy: keyword-only, how the global loss (local_loss=False,
            world_size > 1) is computed: "ring" (memory O(local_N * D) per
            rank, the default) or "gather" (see :mod:`mmkernels.distributed`).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto", strategy: str = "ring"):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("ClipLoss: use_horovod=True is not supported; "
                                      "mmkernels runs over torch.distributed")
        self.strategy = strategy
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    def _distributed_loss(self, image_features, text_features, logit_scale):
        from mmkernels import distributed  # imported by mmkernels/__init__.py: no cost here

        return distributed.clip_loss(image_features, text_features, logit_scale,
                                     local_loss=self.local_loss,
                                     gather_with_grad=self.gather_with_grad,
                                     strategy=self.strategy, backend=self.backend,
                                     claimed=(self.rank, self.world_size))

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        if self.world_size > 1:
            loss = self._distributed_loss(image_features, text_features, logit_scale)
        else:
            loss = contrastive_loss(image_features, text_features, logit_scale,
                                    backend=self.backend)
        if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
            # A bias added to every logit cancels in each softmax: its gradient
            # is exactly zero, as in open_clip, and it stays in the graph.
            loss = loss + 0.0 * logit_bias.sum()
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss``, without the N x N logits.

    Same constructor and ``forward(image_features, text_features, logit_scale,
    logit_bias, output_dict=False)`` as open_clip 3.x: the value is
    ``-sum_ij logsigmoid(z_ij * (S_ij + logit_bias)) / N`` with
    ``S = logit_scale * image_features @ text_features.T``, ``z = +1`` on the
    diagonal and -1 elsewhere, computed by :func:`mmkernels.siglip_loss`.

    With ``world_size > 1`` (torch.distributed initialized, ``rank`` and
    ``world_size`` those of the default group) each rank passes its own
    shard and gets open_clip's value and gradients for that rank: its images
    against the texts of every rank (mmkernels/distributed/siglip.py).
    The texts travel round a ring and only this rank's inputs are kept for
    the backward, so memory per rank stays O(local_N * D) whatever the world
    size (open_clip's keeps every received block and its graph).

    Args:
        cache_labels: accepted for compatibility; no labels matrix is built.
        rank, world_size: this process's place in the default process group.
        dist_impl: open_clip's exchange: "bidir" (default: blocks go both
            ways round the ring) or "shift" (one way). "reduce" and "gather",
            which in open_clip move every block to every rank at once, run
            the bidirectional ring here: same values and gradients, without
            the world_size x memory.
        backend: keyword-only, the mmkernels backend ("auto" by default).
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None, *, backend: str = "auto"):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"dist_impl: expected one of {self.DIST_IMPLS} or None, "
                             f"got {dist_impl!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, "
                             f"got rank={rank}, world_size={world_size}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        bias = 0.0 if logit_bias is None else logit_bias
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, bias,
                               backend=self.backend)
        else:
            self._check_process_group()
            exchange = "shift" if self.dist_impl == "shift" else "bidir"
            loss = siglip_loss_distributed(image_features, text_features, logit_scale, bias,
                                           exchange=exchange, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def _check_process_group(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"SigLipLoss: world_size={self.world_size} needs torch.distributed "
                               "initialized (torch.distributed.init_process_group)")
        actual = (dist.get_rank(), dist.get_world_size())
        if actual != (self.rank, self.world_size):
            raise ValueError(f"rank, world_size: constructed with rank={self.rank}, "
                             f"world_size={self.world_size}, but the default process group has "
                             f"rank={actual[0]}, world_size={actual[1]}")
