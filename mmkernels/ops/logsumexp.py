r"""The primitive: row and column logsumexp of a similarity matrix.

Maths
-----
For features ``a`` (N, D), ``b`` (M, D) and a scalar ``scale``::

    S[i, j]   = scale * ra[i] * rb[j] * <a_i, b_j>       (ra, rb: inverse L2 norms
                                                          when normalizing, else 1)
    row_lse[i] = log sum_j exp(S[i, j])                   (N,)
    col_lse[j] = log sum_i exp(S[i, j])                   (M,)

Every loss of the library is this primitive plus O(N*D) terms
(mmkernels/ops/contrastive.py). Its backward, for upstream gradients
``g_row`` (N,) and ``g_col`` (M,), is::

    P[i, j] = g_row[i] * exp(S[i, j] - row_lse[i]) + g_col[j] * exp(S[i, j] - col_lse[j])

and a backward kernel returns ``pb = P @ Bh`` and ``pa = P.T @ Ah``; the
gradients of a, b and scale follow in O(N*D) (mmkernels/ops/_common.py).

Numerics
--------
Accumulation, statistics and outputs are fp32 (fp64 for fp64 inputs),
whatever the input dtype. Tiled kernels keep an online running maximum per
row and per column (never a fixed shift that assumes |cos| <= 1), so
unnormalized inputs with scale = 100 stay exact. Memory: the tiled backends
hold O(N*D) plus a tile, never S.

Kernel contract (what each backend registers in :data:`KERNELS`)
-----------------------------------------------------------------
``fwd(a, b, scale, normalize) -> (row_lse, col_lse)`` and
``bwd(a, b, scale, normalize, row_lse, col_lse, g_row, g_col) -> (pb, pa)``,
both torch.library ops. ``a``, ``b``: (N, D), (M, D), any strides, dtype
fp16/bf16/fp32/fp64; ``scale``: 0-dim tensor in the compute dtype on the
same device; outputs in the compute dtype. :func:`fwd_reference` and
:func:`bwd_reference` are the contract computed on the materialized S (the
naive backend's pair): a new backend's kernels are tested against them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmkernels import _checks, backends
from mmkernels.ops import _common, masked_logsumexp
from mmkernels.ops._common import TileBuffers, scaled_operand, tiles
from mmkernels.ops._registry import KernelTable


# --- reference --------------------------------------------------------------

def similarity_matrix(a: Tensor, b: Tensor, scale: Tensor, normalize: bool) -> Tensor:
    """S in the compute dtype, materialized (the naive backend; O(N*M) memory)."""
    ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
    return scale * (ah @ bh.T)


def lse_reference(a: Tensor, b: Tensor, scale: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """The primitive computed from the materialized S, differentiable by plain autograd."""
    s = similarity_matrix(a, b, scale, normalize)
    return torch.logsumexp(s, dim=1), torch.logsumexp(s, dim=0)


def fwd_reference(a: Tensor, b: Tensor, scale: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """The forward kernel's contract, on the materialized S."""
    with torch.no_grad():
        return lse_reference(a, b, scale, normalize)


def bwd_reference(a, b, scale, normalize, row_lse, col_lse, g_row, g_col):
    """The backward kernel's contract, on the materialized S: (P @ Bh, P.T @ Ah)."""
    with torch.no_grad():
        ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
        s = scale * (ah @ bh.T)
        p = (g_row.unsqueeze(1) * torch.exp(s - row_lse.unsqueeze(1))
             + g_col * torch.exp(s - col_lse))
        return p @ bh, p.T @ ah


# --- autograd and fake kernels, shared by every backend ---------------------

def _fwd_fake(a: Tensor, b: Tensor, scale: Tensor, normalize: bool):
    dtype = _checks.compute_dtype(a.dtype)
    return a.new_empty(a.shape[0], dtype=dtype), b.new_empty(b.shape[0], dtype=dtype)


def _bwd_fake(a, b, scale, normalize, row_lse, col_lse, g_row, g_col):
    dtype = _checks.compute_dtype(a.dtype)
    return a.new_empty(a.shape, dtype=dtype), b.new_empty(b.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    a, b, scale, normalize = inputs
    row_lse, col_lse = output
    ctx.save_for_backward(a, b, scale, row_lse, col_lse)
    ctx.normalize = normalize


def _backward_through(bwd_op):
    """The autograd formula of a forward op whose backward kernel is ``bwd_op``."""

    def backward(ctx, g_row, g_col):
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        # An output that was not used arrives as None: it contributes nothing.
        g_row = torch.zeros_like(row_lse) if g_row is None else g_row.contiguous()
        g_col = torch.zeros_like(col_lse) if g_col is None else g_col.contiguous()
        pb, pa = bwd_op(a, b, scale, ctx.normalize, row_lse, col_lse, g_row, g_col)
        grad_a, grad_b, grad_scale = _common.grads_from_products(
            a, b, scale, ctx.normalize, pb, pa, ctx.needs_input_grad)
        return grad_a, grad_b, grad_scale, None

    return backward


KERNELS = KernelTable("similarity_logsumexp", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                      setup_context=_setup_context, backward=_backward_through)
KERNELS.register("naive", fwd_reference, bwd_reference, autograd=False)


# --- torch backend: tiled pure PyTorch --------------------------------------

def _merge_tile_stats(run_max: Tensor, run_sum: Tensor, s: Tensor, dim: int, work: Tensor):
    """Fold a tile's exp-sums along ``dim`` into running (max, sum-of-exp) statistics."""
    new_max = torch.maximum(run_max, s.amax(dim))
    exps = torch.sub(s, new_max.unsqueeze(dim), out=work).exp_()
    run_sum.mul_(torch.exp(run_max - new_max)).add_(exps.sum(dim))
    run_max.copy_(new_max)


@torch.library.custom_op("mmkernels::torch_lse_fwd", mutates_args=())
def _torch_lse_fwd(a: Tensor, b: Tensor, scale: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
    alpha = scale.item()  # the matmul applies it for free
    n, m = ah.shape[0], bh.shape[0]
    row_max = ah.new_full((n,), float("-inf"))
    row_sum = ah.new_zeros(n)
    col_max = ah.new_full((m,), float("-inf"))
    col_sum = ah.new_zeros(m)
    buffers = TileBuffers(2, ah, n, m)
    for i0, i1, j0, j1 in tiles(n, m, ah.device):
        s, work = buffers.views(i1 - i0, j1 - j0)
        torch.addmm(s, ah[i0:i1], bh[j0:j1].T, beta=0, alpha=alpha, out=s)
        _merge_tile_stats(row_max[i0:i1], row_sum[i0:i1], s, 1, work)
        _merge_tile_stats(col_max[j0:j1], col_sum[j0:j1], s, 0, work)
    return row_max + row_sum.log(), col_max + col_sum.log()


@torch.library.custom_op("mmkernels::torch_lse_bwd", mutates_args=())
def _torch_lse_bwd(a: Tensor, b: Tensor, scale: Tensor, normalize: bool, row_lse: Tensor,
                   col_lse: Tensor, g_row: Tensor, g_col: Tensor) -> tuple[Tensor, Tensor]:
    ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
    alpha = scale.item()
    n, m = ah.shape[0], bh.shape[0]
    pb = torch.zeros_like(ah)
    pa = torch.zeros_like(bh)
    buffers = TileBuffers(2, ah, n, m)
    for i0, i1, j0, j1 in tiles(n, m, ah.device):
        s, p = buffers.views(i1 - i0, j1 - j0)
        torch.addmm(s, ah[i0:i1], bh[j0:j1].T, beta=0, alpha=alpha, out=s)
        # P = g_row * exp(S - row_lse) + g_col * exp(S - col_lse); S is consumed.
        torch.sub(s, row_lse[i0:i1].unsqueeze(1), out=p).exp_().mul_(g_row[i0:i1].unsqueeze(1))
        p.addcmul_(s.sub_(col_lse[j0:j1]).exp_(), g_col[j0:j1])
        pb[i0:i1].addmm_(p, bh[j0:j1])
        pa[j0:j1].addmm_(p.T, ah[i0:i1])
    return pb, pa


KERNELS.register("torch", _torch_lse_fwd, _torch_lse_bwd)


# --- dispatch and public function --------------------------------------------

def lse(a: Tensor, b: Tensor, scale: Tensor, normalize: bool, backend: str):
    """The primitive on a resolved backend, for inputs already checked. Differentiable.

    With a frozen side (``a`` or ``b`` a constant, or only the scale training) it
    runs the masked family's kernels with no rule on, whose backward computes
    only the products that the gradients need (3 N x M x D products, not 4)."""
    if backend == "naive":  # plain autograd through the materialized S
        return lse_reference(a, b, scale, normalize)
    if backend in masked_logsumexp.KERNELS and _frozen_side(a, b, scale):
        return masked_logsumexp.masked_lse(a, b, scale, normalize,
                                           masked_logsumexp.Exclusions.none(a), backend)
    fwd, _ = KERNELS.kernels(backend, a.device)
    return fwd(a, b, scale, normalize)


def _frozen_side(a: Tensor, b: Tensor, scale: Tensor) -> bool:
    """A backward will run (something requires grad) and one of a, b needs none."""
    return (torch.is_grad_enabled() and not (a.requires_grad and b.requires_grad)
            and (a.requires_grad or b.requires_grad or scale.requires_grad))


@_checks.outside_autocast
def similarity_logsumexp(a: Tensor, b: Tensor, logit_scale=1.0, *, normalize: bool = False,
                         exclude_diagonal: bool = False, row_groups: Tensor | None = None,
                         col_groups: Tensor | None = None, row_threshold: Tensor | None = None,
                         col_threshold: Tensor | None = None, positives: Tensor | None = None,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Row and column logsumexp of ``S = logit_scale * a @ b.T``, never holding S.

    Args:
        a: (N, D) features; fp16, bf16, fp32 or fp64.
        b: (M, D) features of the same dtype and device.
        logit_scale: the multiplier (a number or a 0-dim tensor, which
            receives its gradient).
        normalize: L2-normalize the rows of ``a`` and ``b`` first (fused).
        exclude_diagonal: entry (i, i) leaves row i's and column i's logsumexp
            (self-similarity); needs ``positives`` (a positive is never excluded).
        row_groups, col_groups: (N,) and (M,) int64, given together: entries with
            ``row_groups[i] == col_groups[j]`` leave both statistics.
        row_threshold: (N,) float: entries with ``S[i, j] > row_threshold[i]`` leave
            row i's logsumexp (false-negative filtering). No gradient.
        col_threshold: (M,) float: the same for column j's logsumexp.
        positives: (N,) int64, row i's positive column (never excluded), -1 for
            none; default ``arange(N)`` (needs M >= N).
        backend: "auto" or a backend name (see :mod:`mmkernels.backends`). With an
            exclusion on, "auto" picks the best backend that has masked kernels
            (ops/masked_logsumexp.py lists them); a named one without raises.

    Returns:
        ``(torch.logsumexp(S, dim=1), torch.logsumexp(S, dim=0))`` over the entries
        left, shapes (N,) and (M,), fp32 (fp64 for fp64 inputs), differentiable
        through both; -inf (with no gradient) where no entry is left.
    """
    _checks.check_pair("a", a, "b", b, same_rows=False)
    rules = masked_logsumexp.Exclusions.from_arguments(
        a, b, exclude_diagonal=exclude_diagonal, row_groups=row_groups, col_groups=col_groups,
        row_threshold=row_threshold, col_threshold=col_threshold, positives=positives)
    if rules is None:
        name = backends.select_backend(backend, a.device)
        return lse(a, b, _checks.as_scalar_tensor("logit_scale", logit_scale, a), normalize, name)
    name = masked_logsumexp.masked_backend(backend, a.device)
    scale = _checks.as_scalar_tensor("logit_scale", logit_scale, a)
    return masked_logsumexp.masked_lse(a, b, scale, normalize, rules, name)
