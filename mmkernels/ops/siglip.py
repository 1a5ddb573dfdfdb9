r"""SigLIP's pairwise sigmoid loss, tiled: the second primitive of the library.

Maths
-----
For features ``a`` (N, D), ``b`` (M, D), a scale and a bias::

    S[i, j] = scale * ra[i] * rb[j] * <a_i, b_j>     (ra, rb: inverse L2 norms
                                                     when normalizing, else 1)
    x[i, j] = S[i, j] + bias
    z[i, j] = +1 for a positive pair, -1 for a negative one
    row[i]  = sum_j -logsigmoid(z[i, j] * x[i, j]) = sum_j softplus(-z[i, j] * x[i, j])

In SigLIP (Zhai et al., 2023; open_clip's ``SigLipLoss``) the pairs are the
diagonal, ``z = 2 * eye(N) - 1``, and the loss is ``sum_i row[i] / N``. A
block of the matrix that holds no positives (another rank's texts in the
distributed loss, mmkernels/distributed/siglip.py) has ``z = -1``
everywhere: the kernels take a flag for that. Unlike the softmax losses
there is no normalizer across a row or a column, so each tile's loss and
gradient are elementwise: no running statistics, nothing saved between the
forward and the backward but the inputs.

Backward, for an upstream gradient ``g_row`` (N,)::

    P[i, j] = d row-loss / d x[i, j] * g_row[i] = -z[i, j] * sigmoid(-z[i, j] * x[i, j]) * g_row[i]
            = g_row[i] * (sigmoid(x[i, j]) - [z[i, j] = +1])

and, as for the logsumexp primitive (mmkernels/ops/_common.py), a backward
kernel returns ``pb = P @ Bh`` and ``pa = P.T @ Ah``, from which the
gradients of a, b and scale follow in O(N*D); the bias's gradient is
``sum_ij P[i, j]``, returned as per-row sums.

Numerics
--------
Logits, losses and sums are fp32 (fp64 for fp64 inputs) whatever the input
dtype. ``softplus(u) = max(u, 0) + log1p(exp(-|u|))`` is exact for any |u|:
no overflow at logit_scale 100 on unnormalized features, no cancellation at
a bias of -10. A positive pair's gradient is computed as ``-sigmoid(-x)``,
never as ``sigmoid(x) - 1``, which would lose every digit once the pair is
learnt (x >> 0). Per-row sums accumulate in the compute dtype. The tiled
backends hold O(N*D) plus a tile, never the N x M matrix.

Kernel contract (what each backend registers in :data:`KERNELS`)
-----------------------------------------------------------------
Two torch.library ops::

    fwd(a, b, scale, bias, normalize, positives_on_diagonal) -> row          (N,)
    bwd(a, b, scale, bias, normalize, positives_on_diagonal, g_row)
        -> (pb (N, D), pa (M, D), p_row (N,))     p_row[i] = sum_j P[i, j]

``a``, ``b``: (N, D), (M, D), any strides, fp16/bf16/fp32/fp64; N and M may
differ. ``scale``, ``bias``: 0-dim tensors in the compute dtype on the same
device. ``normalize``: L2-normalize the rows first (F.normalize's eps).
``positives_on_diagonal``: ``z[i, i] = +1`` for ``i < min(N, M)`` and -1
elsewhere when True; -1 everywhere when False. ``g_row``: (N,), compute
dtype, contiguous. Outputs in the compute dtype (fp32, fp64 for fp64
inputs); ``scale`` is not folded into pb and pa. :func:`fwd_reference` and
:func:`bwd_reference` are the contract computed on the materialized matrix:
a new backend's kernels are tested against them (tests/test_siglip.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkernels import _checks, backends
from mmkernels.ops import _common
from mmkernels.ops._common import TileBuffers, scaled_operand, tiles
from mmkernels.ops._registry import KernelTable
from mmkernels.ops.logsumexp import similarity_matrix


# --- reference ------------------------------------------------------------------

def pair_signs(n: int, m: int, positives_on_diagonal: bool, like: Tensor) -> Tensor:
    """z (n, m): +1 on the diagonal when it holds the positives, -1 elsewhere."""
    z = -torch.ones(n, m, dtype=like.dtype, device=like.device)
    if positives_on_diagonal:
        z.diagonal().fill_(1.0)
    return z


def siglip_matrix_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, normalize: bool,
                       positives_on_diagonal: bool) -> Tensor:
    """Per-row losses from the materialized (N, M) matrix (O(N*M) memory), differentiable
    by plain autograd: open_clip's algorithm, in the compute dtype."""
    x = similarity_matrix(a, b, scale, normalize) + bias
    z = pair_signs(x.shape[0], x.shape[1], positives_on_diagonal, x)
    return -F.logsigmoid(z * x).sum(1)


def fwd_reference(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, normalize: bool,
                  positives_on_diagonal: bool) -> Tensor:
    """The forward kernel's contract, on the materialized matrix."""
    with torch.no_grad():
        return siglip_matrix_loss(a, b, scale, bias, normalize, positives_on_diagonal)


def bwd_reference(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, normalize: bool,
                  positives_on_diagonal: bool, g_row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernel's contract, on the materialized matrix."""
    with torch.no_grad():
        ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
        x = scale * (ah @ bh.T) + bias
        z = pair_signs(x.shape[0], x.shape[1], positives_on_diagonal, x)
        p = -z * torch.sigmoid(-z * x) * g_row.unsqueeze(1)
        return p @ bh, p.T @ ah, p.sum(1)


# --- autograd and fake kernels, shared by every backend -------------------------

def _fwd_fake(a, b, scale, bias, normalize, positives_on_diagonal):
    return a.new_empty(a.shape[0], dtype=_checks.compute_dtype(a.dtype))


def _bwd_fake(a, b, scale, bias, normalize, positives_on_diagonal, g_row):
    dtype = _checks.compute_dtype(a.dtype)
    return (a.new_empty(a.shape, dtype=dtype), b.new_empty(b.shape, dtype=dtype),
            a.new_empty(a.shape[0], dtype=dtype))


def _setup_context(ctx, inputs, output):
    a, b, scale, bias, normalize, positives_on_diagonal = inputs
    ctx.save_for_backward(a, b, scale, bias)
    ctx.normalize = normalize
    ctx.positives_on_diagonal = positives_on_diagonal


def _backward_through(bwd_op):
    """The autograd formula of a forward op whose backward kernel is ``bwd_op``."""

    def backward(ctx, g_row):
        a, b, scale, bias = ctx.saved_tensors
        pb, pa, p_row = bwd_op(a, b, scale, bias, ctx.normalize, ctx.positives_on_diagonal,
                               g_row.contiguous())
        grad_a, grad_b, grad_scale = _common.grads_from_products(
            a, b, scale, ctx.normalize, pb, pa, ctx.needs_input_grad)
        grad_bias = p_row.sum() if ctx.needs_input_grad[3] else None
        return grad_a, grad_b, grad_scale, grad_bias, None, None

    return backward


KERNELS = KernelTable("siglip_loss", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                      setup_context=_setup_context, backward=_backward_through)
KERNELS.register("naive", fwd_reference, bwd_reference, autograd=False)


# --- torch backend: tiled pure PyTorch ------------------------------------------

def _positives(tile: Tensor, i0: int, j0: int, positives_on_diagonal: bool) -> Tensor | None:
    """View of the tile's entries with global row == global column (the positive
    pairs), or None when the tile holds none."""
    if not positives_on_diagonal:
        return None
    diagonal = torch.diagonal(tile, offset=i0 - j0)  # entries (r, r + i0 - j0)
    return diagonal if diagonal.numel() else None


def _logit_tiles(ah: Tensor, bh: Tensor, scale: Tensor, bias: Tensor, positives_on_diagonal: bool):
    """Every tile of S + bias, computed into one reused buffer: yields
    ``(i0, i1, j0, j1, x, positives, x_pos)``, ``positives`` the view of the tile's
    positive pairs (or None) and ``x_pos`` their values, kept before the caller
    overwrites ``x`` in place."""
    alpha = scale.item()  # the matmul applies it for free, and adds the bias
    n, m = ah.shape[0], bh.shape[0]
    buffers = TileBuffers(1, ah, n, m)
    for i0, i1, j0, j1 in tiles(n, m, ah.device):
        (x,) = buffers.views(i1 - i0, j1 - j0)
        torch.addmm(bias, ah[i0:i1], bh[j0:j1].T, alpha=alpha, out=x)
        positives = _positives(x, i0, j0, positives_on_diagonal)
        yield i0, i1, j0, j1, x, positives, None if positives is None else positives.clone()


@torch.library.custom_op("mmkernels::torch_siglip_fwd", mutates_args=())
def _torch_siglip_fwd(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, normalize: bool,
                      positives_on_diagonal: bool) -> Tensor:
    ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
    row = ah.new_zeros(ah.shape[0])
    zero = ah.new_zeros(())
    for i0, i1, _, _, x, positives, x_pos in _logit_tiles(ah, bh, scale, bias, positives_on_diagonal):
        # Negatives: softplus(x) = logaddexp(x, 0), stable for any |x|, in one pass.
        torch.logaddexp(x, zero, out=x)
        if positives is not None:
            positives.copy_(torch.logaddexp(-x_pos, zero))
        row[i0:i1] += x.sum(1)
    return row


@torch.library.custom_op("mmkernels::torch_siglip_bwd", mutates_args=())
def _torch_siglip_bwd(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, normalize: bool,
                      positives_on_diagonal: bool, g_row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
    pb = torch.zeros_like(ah)
    pa = torch.zeros_like(bh)
    p_row = ah.new_zeros(ah.shape[0])
    for i0, i1, j0, j1, p, positives, x_pos in _logit_tiles(ah, bh, scale, bias,
                                                            positives_on_diagonal):
        p.sigmoid_()  # negatives: d softplus(x) / dx
        if positives is not None:  # -sigmoid(-x): exact even when sigmoid(x) rounds to 1
            positives.copy_(torch.sigmoid(-x_pos).neg_())
        p.mul_(g_row[i0:i1].unsqueeze(1))
        p_row[i0:i1] += p.sum(1)
        pb[i0:i1].addmm_(p, bh[j0:j1])
        pa[j0:j1].addmm_(p.T, ah[i0:i1])
    return pb, pa, p_row


KERNELS.register("torch", _torch_siglip_fwd, _torch_siglip_bwd)


# --- dispatch and public function ------------------------------------------------

def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":  # open_clip's SigLipLoss: the total over the batch size N
        return per_row.sum() / per_row.shape[0]
    if reduction == "sum":
        return per_row.sum()
    return per_row


def check_inputs(image_features, text_features, logit_scale, logit_bias, reduction, backend):
    """The API-boundary checks of siglip_loss; returns (backend name, scale, bias)."""
    _checks.check_pair("image_features", image_features, "text_features", text_features,
                       same_rows=True)
    _checks.check_reduction(reduction)
    name = backends.select_backend(backend, image_features.device)
    scale = _checks.as_scalar_tensor("logit_scale", logit_scale, image_features)
    bias = _checks.as_scalar_tensor("logit_bias", logit_bias, image_features)
    return name, scale, bias


@_checks.outside_autocast
def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale=1.0, logit_bias=0.0,
                *, normalize: bool = False, reduction: str = "mean",
                backend: str = "auto") -> Tensor:
    """SigLIP's pairwise sigmoid loss without the N x N matrix.

    With ``S = logit_scale * image_features @ text_features.T`` and ``z = +1``
    on the diagonal, -1 elsewhere, the per-row losses are
    ``-sum_j logsigmoid(z[i, j] * (S[i, j] + logit_bias))``; "mean" divides
    their total by N, exactly open_clip's ``SigLipLoss()(image_features,
    text_features, logit_scale, logit_bias)``.

    Args:
        image_features, text_features: (N, D) each; same dtype (fp16, bf16,
            fp32, fp64) and device.
        logit_scale: the multiplier itself (already exponentiated), a number
            or a 0-dim tensor that receives its gradient.
        logit_bias: added to every logit; a number or a 0-dim tensor that
            receives its gradient.
        normalize: L2-normalize the features first (fused into the kernels).
        reduction: "mean" (default: the total over N, open_clip's), "sum", or
            "none" for the (N,) per-row losses.
        backend: "auto" or a backend name (see :mod:`mmkernels.backends`).

    Returns:
        fp32 loss (fp64 for fp64 inputs); gradients in the input dtype.
    """
    name, scale, bias = check_inputs(image_features, text_features, logit_scale, logit_bias,
                                     reduction, backend)
    if name == "naive":
        per_row = siglip_matrix_loss(image_features, text_features, scale, bias, normalize, True)
    else:
        fwd, _ = KERNELS.kernels(name, image_features.device)
        per_row = fwd(image_features, text_features, scale, bias, normalize, True)
    return _reduce(per_row, reduction)
