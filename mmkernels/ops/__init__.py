"""One module per op: maths docstring, reference, kernels of the torch
backend, registration, public function. Importing this package registers the
torch backend's kernels with every op."""

from mmkernels.ops.contrastive import contrastive_loss, info_nce
from mmkernels.ops.embedding import multiple_negatives_loss
from mmkernels.ops.logsumexp import similarity_logsumexp
from mmkernels.ops.similarity import normalized_similarity
from mmkernels.ops.siglip import siglip_loss

__all__ = ["contrastive_loss", "info_nce", "similarity_logsumexp", "normalized_similarity",
           "siglip_loss", "multiple_negatives_loss"]
