"""mmkernels: memory-efficient fused kernels for contrastive multimodal training.

The public API (names and semantics fixed by the project's API contract):

- :func:`contrastive_loss`: symmetric CLIP loss, never holding the N x N matrix
- :func:`info_nce`: one-direction InfoNCE over a rectangular similarity matrix
- :func:`multiple_negatives_loss`: sentence-transformers' MultipleNegativesRankingLoss on embeddings
- :func:`similarity_logsumexp`: the tiled primitive (row and column logsumexp)
- :func:`normalized_similarity`: cosine-similarity matrix, normalization fused
- :class:`ClipLoss`: drop-in for open_clip's ClipLoss
- :func:`siglip_loss`: SigLIP's pairwise sigmoid loss, never holding the N x N matrix
- :class:`SigLipLoss`: drop-in for open_clip's SigLipLoss
- :func:`available_backends`: which kernel families run here
"""

__version__ = "0.1.0"

from mmkernels import backends, distributed  # noqa: F401  (mmkernels.distributed)
from mmkernels.backends import available_backends
from mmkernels.nn import ClipLoss, SigLipLoss
from mmkernels.ops import contrastive_loss, info_nce, normalized_similarity, similarity_logsumexp
from mmkernels.ops import multiple_negatives_loss, siglip_loss


# Every backend usable in this process registers its kernels now (the torch and
# naive backends did, with mmkernels.ops): torch.compile can then trace any call
# without meeting an import, and a backend not usable now has none (its error says why).
if backends.usable_in_process("triton"):
    import mmkernels.triton  # noqa: E402,F401
if backends.usable_in_process("cpu") or backends.usable_in_process("cuda"):
    import mmkernels.compiled  # noqa: E402,F401

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "available_backends",
    "contrastive_loss",
    "info_nce",
    "multiple_negatives_loss",
    "normalized_similarity",
    "similarity_logsumexp",
    "siglip_loss",
    "__version__",
]
