"""sentence-transformers' MultipleNegativesRankingLoss and its gradient-cached variant,
computed without the N x N*(1+k) similarity matrix by
:func:`mmkernels.multiple_negatives_loss`.

    from mmkernels.integrations.sentence_transformers import (
        CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss)
    loss = MultipleNegativesRankingLoss(model, scale=20.0)        # as sentence_transformers.losses'
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=32)

Same constructors (plus ``false_negative_margin`` and ``backend``), forward, config
and citation as the originals (they are subclasses); the loss on the same
embeddings is theirs to fp32 round-off. Options whose maths does not compose the
primitive raise NotImplementedError at construction.

``gather_across_devices=True`` (an initialized torch.distributed group): theirs
all-gathers every column (with gradients) and scores this rank's queries against
the global batch; its value on each rank is the mean over that rank's own
queries, and its all-gather's backward sums every rank's value's gradient into
each rank's embeddings. Here the same global batch is scored by the ring of
:func:`mmkernels.distributed.multiple_negatives_loss` (no gathered features, no
local x global score matrix), but that function returns the global loss on every
rank, so the drop-in takes the ring's per-query losses of this rank's queries and
returns their mean: theirs, value and gradients (for their equal local batches,
the gradients are also the distributed function's ``W * dL/dx``).

Gradient caching (GradCache, Gao et al. 2021), as sentence-transformers does it:
(1) embed every mini-batch without a graph, (2) compute the loss on all the
embeddings and back-propagate it to them, keeping those gradients, (3) re-embed
each mini-batch with a graph (the RNG replayed, so dropout draws the same masks)
and back-propagate the kept gradients through the model. Steps (1) and (3) are
theirs, inherited; the cached class replaces step (2) only. Theirs chunks step (2)
by ``mini_batch_size`` rows of the similarity matrix to bound its memory; the
kernels never hold that matrix, so step (2) is one call here. The loss is a
function of the embeddings alone, so the gradients equal the uncached loss's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from sentence_transformers import util
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss as _CachedMultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses import (
    MultipleNegativesRankingLoss as _MultipleNegativesRankingLoss,
)
from torch import Tensor

from mmkernels import _checks
from mmkernels.ops.contrastive import check_margin
from mmkernels.ops.embedding import multiple_negatives_loss

# The similarity functions the kernels compute: cos_sim fuses the normalization.
_NORMALIZE = {util.cos_sim: True, util.dot_score: False}


def _normalize_for(similarity_fct) -> bool:
    """``normalize`` of multiple_negatives_loss for ``similarity_fct``; raises naming it."""
    try:
        return _NORMALIZE[similarity_fct]
    except (KeyError, TypeError):  # TypeError: an unhashable callable
        raise ValueError(f"similarity_fct: expected sentence_transformers.util.cos_sim or "
                         f"util.dot_score, got {getattr(similarity_fct, '__name__', similarity_fct)!r}"
                         ) from None


def _check_supported(similarity_fct, hardness_mode, hardness_strength):
    """The options the drop-ins refuse, each error naming its argument."""
    _normalize_for(similarity_fct)
    if hardness_mode is not None and hardness_strength > 0.0:
        # a stop-gradient penalty on some logits gives them a forward scale (scale +
        # strength) other than their backward one (scale): not one logsumexp of S
        raise NotImplementedError(
            f"hardness_mode={hardness_mode!r} with hardness_strength={hardness_strength}: "
            f"not supported by the mmkernels drop-in; use the original loss")


def _gathering() -> bool:
    """Whether gather_across_devices=True has ranks to gather from: theirs, without an
    initialized process group, warns and computes the local batch's loss."""
    return dist.is_available() and dist.is_initialized()


@_checks.outside_autocast
def _own_queries_loss(query: Tensor, docs: list[Tensor], *, logit_scale, directions,
                      partition_mode, false_negative_margin, normalize, backend) -> Tensor:
    """sentence-transformers' ``gather_across_devices=True`` value on this rank: the mean,
    over this rank's queries, of their losses against the global batch (the batch and
    the ring of :func:`mmkernels.distributed.multiple_negatives_loss`, whose checks and
    agreement between ranks run first). Collective. Its backward is the ring's: each
    rank's embeddings receive the gradients of every rank's value, as from their
    all-gather's backward."""
    from mmkernels.distributed import embedding as _ring_loss  # only where it is used

    ring, docs, directions, margin, scale, name, trains = _ring_loss._agree(
        None, query, docs, logit_scale, directions=directions, partition_mode=partition_mode,
        margin=false_negative_margin, normalize=normalize, reduction="mean", backend=backend)
    if ring.size == 1:
        return multiple_negatives_loss(query, docs, logit_scale=scale, directions=directions,
                                       partition_mode=partition_mode,
                                       false_negative_margin=margin, normalize=normalize,
                                       backend=name)
    # Not the distributed function itself: it returns the global loss on every rank
    # (its LossOverRanks), theirs is each rank's own queries' mean.
    return _ring_loss._global_per_row(query, docs, scale, ring, directions, partition_mode,
                                      margin, normalize, name, trains).mean()


class MultipleNegativesRankingLoss(_MultipleNegativesRankingLoss):
    """Drop-in for ``sentence_transformers.losses.MultipleNegativesRankingLoss``.

    Extra arguments: ``false_negative_margin`` (see
    :func:`mmkernels.multiple_negatives_loss`; logit units, after ``scale``) and
    ``backend``. ``similarity_fct`` must be ``util.cos_sim`` or ``util.dot_score``.

    ``gather_across_devices=True`` over an initialized process group is theirs on
    every rank: the loss value is the mean over this rank's queries against the
    global batch (queries, then each document column, concatenated in rank order),
    not the global loss that :func:`mmkernels.distributed.multiple_negatives_loss`
    returns; each rank's embedding gradients sum those of every rank's value (their
    all-gather's backward), which for their equal local batches is that function's
    ``world_size * dL/dx``, so DDP's averaging gives the global batch's gradient.
    Computed by that function's ring, O(local batch) memory per rank; collective:
    every rank must call the loss and its backward. Local batches may differ in
    size here (theirs needs them equal). Without a process group it is the local
    loss, as theirs.

    ``hardness_mode`` with a positive ``hardness_strength`` is refused: its penalty
    ``strength * stop_grad(cos)`` gives the penalised logits a forward scale
    (``scale + strength``) other than their backward one, so the denominator is not
    one logsumexp of ``scale * S`` (the primitive).
    """

    def __init__(self, model, scale: float = 20.0, similarity_fct=util.cos_sim,
                 gather_across_devices: bool = False, directions=("query_to_doc",),
                 partition_mode="joint", hardness_mode=None, hardness_strength: float = 0.0,
                 *, false_negative_margin=None, backend: str = "auto") -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, hardness_mode=hardness_mode,
                         hardness_strength=hardness_strength)
        _check_supported(similarity_fct, hardness_mode, hardness_strength)
        self.false_negative_margin = false_negative_margin
        self.backend = backend

    @property
    def false_negative_margin(self) -> float | None:
        return self._false_negative_margin

    @false_negative_margin.setter
    def false_negative_margin(self, value) -> None:
        self._false_negative_margin = check_margin(value)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        loss = _own_queries_loss if self.gather_across_devices and _gathering() else \
            multiple_negatives_loss
        return loss(embeddings[0], list(embeddings[1:]), logit_scale=self.scale,
                    directions=self.directions, partition_mode=self.partition_mode,
                    false_negative_margin=self.false_negative_margin,
                    normalize=_normalize_for(self.similarity_fct), backend=self.backend)

    def get_config_dict(self):
        config = super().get_config_dict()
        config["false_negative_margin"] = self.false_negative_margin
        return config


class CachedMultipleNegativesRankingLoss(_CachedMultipleNegativesRankingLoss):
    """Drop-in for ``sentence_transformers.losses.CachedMultipleNegativesRankingLoss``.

    Its gradient caching (mini-batched embedding without a graph, loss and
    gradients on all the embeddings, mini-batched re-embedding with the kept
    gradients), with the loss stage computed by
    :func:`mmkernels.multiple_negatives_loss` in one call: no N x N*(1+k) matrix,
    so nothing to chunk. The gradients are those of the uncached loss.

    ``gather_across_devices=True`` composes with the caching as in theirs: only the
    loss stage is collective (every rank's embeddings of its whole local batch
    against the global batch, one call of the ring, its backward filling the cache
    of each rank with the gradients of every rank's value); the embedding stages
    stay local. Value and gradients: those of the uncached drop-in with
    ``gather_across_devices=True`` (and of theirs), every rank taking part in each
    forward and backward.

    Extra arguments and refusals: as :class:`MultipleNegativesRankingLoss` (the
    wrapped loss, ``self.loss``, which holds every hyperparameter): extra
    ``false_negative_margin`` and ``backend``; ``similarity_fct`` ``util.cos_sim``
    or ``util.dot_score``; no ``hardness_mode`` with a positive
    ``hardness_strength``. ``mini_batch_size``,
    ``mini_batch_num_tokens`` and ``show_progress_bar`` bound and show the
    embedding steps, as in theirs.
    """

    # also assigned through to the wrapped loss (theirs delegates its hyperparameters so)
    _delegated_to_wrapped_loss = (_CachedMultipleNegativesRankingLoss._delegated_to_wrapped_loss
                                  + ("false_negative_margin", "backend"))

    def __init__(self, model, scale: float = 20.0, similarity_fct=util.cos_sim,
                 mini_batch_size: int = 32, mini_batch_num_tokens: int | None = None,
                 gather_across_devices: bool = False, directions=("query_to_doc",),
                 partition_mode="joint", show_progress_bar: bool = False, hardness_mode=None,
                 hardness_strength: float = 0.0, *, false_negative_margin=None,
                 backend: str = "auto") -> None:
        # ours first: its errors (and the originals' on the shared arguments) come before
        # anything of the cached class runs on the model
        loss = MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength, false_negative_margin=false_negative_margin,
            backend=backend)
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, show_progress_bar=show_progress_bar,
                         hardness_mode=hardness_mode, hardness_strength=hardness_strength)
        self.loss = loss  # in place of their MultipleNegativesRankingLoss

    @property
    def false_negative_margin(self) -> float | None:
        return self.loss.false_negative_margin

    @property
    def backend(self) -> str:
        return self.loss.backend

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss on every column's mini-batch embeddings (``reps[c][b]``); with
        ``with_backward``, back-propagated to them (their ``.grad`` is the cache) and
        returned detached."""
        embeddings = [torch.cat(column) for column in reps]
        loss = self.loss.compute_loss_from_embeddings(embeddings, labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def get_config_dict(self):
        config = super().get_config_dict()
        config["false_negative_margin"] = self.false_negative_margin
        return config
