"""The losses of a global batch spread over torch.distributed ranks.

- :func:`contrastive_loss`: the symmetric CLIP loss of the global batch (with
  the single-process loss's margin, groups and debiasing options), by a
  point-to-point ring (O(local_N * D) per rank) or an all-gather
  (clip.py explains the maths and the strategies);
- :func:`clip_loss`: what :class:`mmkernels.ClipLoss` runs for world_size > 1
  (open_clip's local_loss / gather_with_grad flags);
- :func:`siglip_loss_distributed`: this rank's SigLIP loss against the texts of
  every rank, by ring exchange (siglip.py).

Shared pieces: _ring.py (the ring of ranks and its point-to-point messages),
_lse_ring.py (the ring of the logsumexp primitive, masked or not: the CLIP and
embedding losses'), _autograd.py (the differentiable all-gather, sums over
ranks and group sums), _kernels.py (the tile kernels the rings run).
"""

from mmkernels.distributed.clip import STRATEGIES, clip_loss, contrastive_loss
from mmkernels.distributed.embedding import multiple_negatives_loss
from mmkernels.distributed.siglip import EXCHANGES, siglip_loss_distributed

__all__ = ["STRATEGIES", "EXCHANGES", "clip_loss", "contrastive_loss",
           "multiple_negatives_loss", "siglip_loss_distributed"]
