"""Loss modules: drop-ins for open_clip's, computed by the tiled kernels."""

from __future__ import annotations

from torch import Tensor, nn

from mmkernels.ops.contrastive import contrastive_loss


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
