"""What the loss test files share: the test shapes and dtypes, inputs that stress the
kernels, and each loss paired with its fp64 reference as compare() calls them.

``Loss.compare(backend, inputs, dtype, ...)`` runs compare_to_reference.compare on
the loss with ``backend`` and the reference, both with the same options.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

import mmkernels
import reference
import siglip_reference
from compare_to_reference import compare

# (N, D): N = 1, D = 1, and sizes that straddle the 8 x 16 test tiles.
SHAPES = [(1, 1), (1, 7), (2, 1), (7, 3), (8, 16), (9, 17), (17, 33), (40, 70)]
HALF = [torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class Loss:
    """A loss under test: ``ours(backend, **options)`` and ``reference(**options)``
    return functions of ``(*features, scale)``, the form compare() calls."""
    ours: Callable
    reference: Callable

    def compare(self, backend, inputs, dtype, *, scale=None, what="", rtol=None, **options):
        """compare() of the loss on ``backend`` against its reference, with ``options``."""
        compare(self.ours(backend, **options), self.reference(**options), inputs, dtype, scale=scale,
                what=what, rtol=rtol)


CONTRASTIVE = Loss(lambda backend, **options: partial(mmkernels.contrastive_loss, backend=backend, **options),
                   lambda **options: partial(reference.contrastive, **options))
LOGSUMEXP = Loss(lambda backend, **options: partial(mmkernels.similarity_logsumexp, backend=backend,
                                                    **options),
                 lambda **options: partial(reference.logsumexp, **options))
# info_nce takes its labels between the features and the scale.
INFO_NCE = Loss(lambda backend, labels=None, **options: lambda q, k, s: mmkernels.info_nce(
                    q, k, labels, s, backend=backend, **options),
                lambda labels=None, **options: lambda q, k, s: reference.info_nce(q, k, labels, s, **options))
# compare() checks one scalar leaf besides the features: for SigLIP a (2,) tensor holds
# (logit_scale, logit_bias), so both gradients are compared (siglip_scalars).
SIGLIP = Loss(lambda backend, **options: lambda a, b, sb: mmkernels.siglip_loss(
                  a, b, sb[0], sb[1], backend=backend, **options),
              lambda **options: lambda a, b, sb: siglip_reference.siglip(a, b, sb[0], sb[1], **options))


def siglip_scalars(scale: float, bias: float) -> torch.Tensor:
    """SIGLIP's scale argument for compare(): (logit_scale, logit_bias) as one leaf."""
    return torch.tensor([scale, bias])


# --- inputs --------------------------------------------------------------------------

def square_pair(shape) -> list[torch.Tensor]:
    """Two (N, D) feature matrices, for the losses over N pairs."""
    n, d = shape
    return [torch.randn(n, d), torch.randn(n, d)]


def noncontiguous_pair() -> list[torch.Tensor]:
    """Two (15, 22) feature matrices, neither contiguous: strided rows with an offset
    start, and a transposed storage."""
    base_a, base_b = torch.randn(30, 40), torch.randn(40, 30)
    a = base_a[::2, 3:25]          # strided rows, offset columns
    b = base_b.T[1:31:2, :22]      # transposed storage
    assert not a.is_contiguous() and not b.is_contiguous()
    return [a, b]


def spread_rows(n: int, m: int, d: int, *, row_scales: tuple[float, float], b_scale: float,
                device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """a (n, d) with its rows scaled from ``row_scales[0]`` to ``row_scales[1]`` and
    b (m, d) times ``b_scale``: unnormalized features whose rows' and columns' largest
    logits differ widely (a test of the running maxima; at scale 100 they reach the
    hundreds or thousands: largest_logit)."""
    lowest, highest = row_scales
    a = torch.randn(n, d, device=device) * torch.linspace(lowest, highest, n, device=device).unsqueeze(1)
    b = torch.randn(m, d, device=device) * b_scale
    return a, b


def largest_logit(a: torch.Tensor, b: torch.Tensor, scale: float = 100.0) -> float:
    """max |scale * a @ b.T|, what fp32_logit_rtol scales its tolerance by."""
    return (scale * a @ b.T).abs().max().item()
