"""sentence-transformers' MultipleNegativesRankingLoss, computed without the
N x N*(1+k) similarity matrix by :func:`mmkernels.multiple_negatives_loss`.

    from mmkernels.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model, scale=20.0)  # as sentence_transformers.losses'

Same constructor (plus ``false_negative_margin`` and ``backend``), forward, config
and citation as the original (it is a subclass); the loss on the same embeddings
is theirs to fp32 round-off. Options whose maths does not compose the primitive
raise NotImplementedError at construction.
"""

from __future__ import annotations

from sentence_transformers import util
from sentence_transformers.sentence_transformer.losses import (
    MultipleNegativesRankingLoss as _MultipleNegativesRankingLoss,
)
from torch import Tensor

from mmkernels.ops.contrastive import check_margin
from mmkernels.ops.embedding import multiple_negatives_loss

# The similarity functions the kernels compute: cos_sim fuses the normalization.
_NORMALIZE = {util.cos_sim: True, util.dot_score: False}


class MultipleNegativesRankingLoss(_MultipleNegativesRankingLoss):
    """Drop-in for ``sentence_transformers.losses.MultipleNegativesRankingLoss``.

    Extra arguments: ``false_negative_margin`` (see
    :func:`mmkernels.multiple_negatives_loss`; logit units, after ``scale``) and
    ``backend``. ``similarity_fct`` must be ``util.cos_sim`` or ``util.dot_score``;
    ``gather_across_devices=True`` and a ``hardness_mode`` with a positive
    ``hardness_strength`` are not supported.
    """

    def __init__(self, model, scale: float = 20.0, similarity_fct=util.cos_sim,
                 gather_across_devices: bool = False, directions=("query_to_doc",),
                 partition_mode="joint", hardness_mode=None, hardness_strength: float = 0.0,
                 *, false_negative_margin=None, backend: str = "auto") -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, hardness_mode=hardness_mode,
                         hardness_strength=hardness_strength)
        if similarity_fct not in _NORMALIZE:
            raise ValueError(f"similarity_fct: expected sentence_transformers.util.cos_sim or "
                             f"util.dot_score, got {getattr(similarity_fct, '__name__', similarity_fct)!r}")
        if gather_across_devices:
            raise NotImplementedError(
                "gather_across_devices=True: not supported by the mmkernels drop-in (each rank "
                "would need only its own queries' rows); use the original loss, or "
                "mmkernels.distributed for a global-batch contrastive loss")
        if hardness_mode is not None and hardness_strength > 0.0:
            # a stop-gradient penalty per negative logit is not a logsumexp of S
            raise NotImplementedError(
                f"hardness_mode={hardness_mode!r} with hardness_strength={hardness_strength}: "
                f"not supported by the mmkernels drop-in; use the original loss")
        self.false_negative_margin = check_margin(false_negative_margin)
        self.backend = backend

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        return multiple_negatives_loss(
            embeddings[0], list(embeddings[1:]), logit_scale=self.scale,
            directions=self.directions, partition_mode=self.partition_mode,
            false_negative_margin=self.false_negative_margin,
            normalize=_NORMALIZE[self.similarity_fct], backend=self.backend)

    def get_config_dict(self):
        config = super().get_config_dict()
        config["false_negative_margin"] = self.false_negative_margin
        return config
