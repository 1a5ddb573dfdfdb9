r"""The primitive with exclusions: entries of S that leave a row's or a column's logsumexp.

Maths
-----
S is the primitive's (ops/logsumexp.py): ``S[i, j] = scale * ra[i] * rb[j] * <a_i, b_j>``.
Each row i has a positive column ``pos[i]`` (``positives``; default ``i``, which
needs M >= N; ``-1`` where row i has no positive in this matrix). The pair
(i, j) is *positive* when ``j == pos[i]``; a positive pair is never excluded.
Any other entry leaves row i's logsumexp when any of

- ``exclude_diagonal`` and ``j == i`` (self-similarity: query-query, doc-doc terms);
- ``row_groups[i] == col_groups[j]`` (another copy of a duplicated item);
- ``S[i, j] > row_threshold[i]`` (false-negative filtering), strictly: a logit
  equal to its threshold stays;

and leaves column j's logsumexp under the same rules with ``col_threshold[j]``
in place of ``row_threshold[i]``. So::

    row_lse[i] = log sum_{j not excluded from row i} exp(S[i, j])     (-inf if none is left)
    col_lse[j] = log sum_{i not excluded from column j} exp(S[i, j])

The backward is the primitive's with P = 0 wherever an entry is excluded
(from the row term, the column term, or both); groups, thresholds and
positives receive no gradient. A row (column) with every entry excluded has
``lse = -inf`` and no gradient (its P row is 0), never NaN.

A threshold compares the logit as the kernel computes it (the compute dtype,
scale applied). The backward recomputes each tile of S with the same call on
the same operands as the forward on the naive, torch, cpu and cuda backends
(the cpu kernels' forward and backward share one tile schedule and BLAS call;
the cuda kernels one tile code, k order and epilogue), so the forward's and
the backward's decisions at a tie agree bit for bit on each backend; on triton, forward and backward share the K loop and
BLOCK_K (what a GPU does not guarantee: mmkernels/triton/logsumexp.py). Two
backends may decide a tie apart: their S can differ in the last bits.

Cost: the mask is decided per tile from O(tile) loads (groups, thresholds,
positives of the tile's rows and columns) and a compare per logit; nothing of
size N x M is built beyond the tile.

Kernel contract (what a backend registers in :data:`KERNELS`)
-------------------------------------------------------------
``fwd(a, b, scale, normalize, exclude_diagonal, positives, row_groups, col_groups,
row_threshold, col_threshold) -> (row_lse, col_lse)`` and ``bwd(same ten,
row_lse, col_lse, g_row, g_col, compute_pb, compute_pa) -> (pb, pa)``: the
primitive's contract plus the rules and, for a frozen side, which products to
compute (a product not asked for is returned empty, shape (0,), and costs
nothing: 3 N x M x D products instead of 4 when ``a`` or ``b`` is a constant);
the rules come as :class:`Exclusions` prepared them (``positives`` always an (N,)
int64 tensor; the others None or tensors on the features' device, thresholds
in the compute dtype). Backends with these kernels so far: naive, torch, cpu,
cuda, triton.

The family also serves the unmasked primitive when a side is frozen: with no
rule on (:meth:`Exclusions.none`) its kernels are the unmasked ones, and their
backward skips the frozen side's product (ops/logsumexp.py ``lse``, and the
distributed ring's backward).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mmkernels import _checks, backends
from mmkernels.ops import _common
from mmkernels.ops._common import TileBuffers, scaled_operand, tiles
from mmkernels.ops._registry import KernelTable


# --- the rules, checked once --------------------------------------------------

@dataclass(frozen=True)
class Exclusions:
    """The exclusion rules of one call, checked and on the features' device."""
    exclude_diagonal: bool
    positives: Tensor
    row_groups: Optional[Tensor]
    col_groups: Optional[Tensor]
    row_threshold: Optional[Tensor]
    col_threshold: Optional[Tensor]

    def as_args(self) -> tuple:
        return (self.exclude_diagonal, self.positives, self.row_groups, self.col_groups,
                self.row_threshold, self.col_threshold)

    @staticmethod
    def none(a: Tensor) -> "Exclusions":
        """No rule on: the unmasked primitive through these kernels (for their
        frozen-side backward); positives -1, nothing to exempt."""
        return Exclusions(False, torch.full((a.shape[0],), -1, dtype=torch.int64, device=a.device),
                          None, None, None, None)

    @staticmethod
    def from_arguments(a: Tensor, b: Tensor, *, exclude_diagonal=False, row_groups=None,
                       col_groups=None, row_threshold=None, col_threshold=None,
                       positives=None) -> Optional["Exclusions"]:
        """The rules for features ``a`` (N, D), ``b`` (M, D), or None when no rule is on
        (the unmasked primitive). Raises, naming the argument, for a bad one."""
        n, m = a.shape[0], b.shape[0]
        if not isinstance(exclude_diagonal, bool):
            raise TypeError(f"exclude_diagonal: expected a bool, got {type(exclude_diagonal).__name__}")
        if (row_groups is None) != (col_groups is None):
            given = "row_groups" if row_groups is not None else "col_groups"
            raise ValueError(f"{given}: row_groups and col_groups go together (a row and a "
                             f"column are the same item when their groups are equal)")
        row_groups = _index_vector("row_groups", row_groups, n, a.device)
        col_groups = _index_vector("col_groups", col_groups, m, a.device)
        dtype = _checks.compute_dtype(a.dtype)
        row_threshold = _threshold("row_threshold", row_threshold, n, a.device, dtype)
        col_threshold = _threshold("col_threshold", col_threshold, m, a.device, dtype)
        if positives is not None:
            positives = _index_vector("positives", positives, n, a.device)
            _check_range("positives", positives, -1, m)
        if not (exclude_diagonal or row_groups is not None or row_threshold is not None
                or col_threshold is not None):
            return None
        if positives is None:
            if exclude_diagonal:
                raise ValueError(
                    "exclude_diagonal: with the default positives (the diagonal) it excludes "
                    "nothing, as a positive is never excluded; pass positives (e.g. "
                    "torch.full((N,), -1) for a query-query term)")
            if m < n:
                raise ValueError(f"positives: the default (row i's positive is column i) needs "
                                 f"M >= N, got N = {n}, M = {m}; pass positives")
            positives = torch.arange(n, device=a.device)
        return Exclusions(exclude_diagonal, positives, row_groups, col_groups,
                          row_threshold, col_threshold)


def _index_vector(name: str, x, length: int, device: torch.device) -> Optional[Tensor]:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise _checks.DTypeError(f"{name}: expected dtype int64, got {x.dtype}")
    if x.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, but the features are on {device}")
    return x.contiguous()


def _threshold(name: str, x, length: int, device: torch.device, dtype) -> Optional[Tensor]:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise _checks.DTypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, but the features are on {device}")
    if not torch.compiler.is_compiling() and torch.isnan(x).any():
        raise ValueError(f"{name}: contains NaN (no logit compares above NaN; use +inf "
                         f"for a row without a threshold)")
    return x.detach().to(dtype).contiguous()  # thresholds receive no gradient


def _check_range(name: str, x: Tensor, low: int, high: int) -> None:
    """low <= x < high, checked on the host (one sync, before any kernel; not
    while torch.compile traces, where a value is not known)."""
    if torch.compiler.is_compiling():
        return
    if not x.numel():
        return
    smallest, largest = torch.stack(torch.aminmax(x)).tolist()
    if smallest < low or largest >= high:
        raise ValueError(f"{name}: values must lie in [{low}, {high}), got [{smallest}, {largest}]")


# --- the mask of one tile of S (the rules, written once) ----------------------------

# Why float masks (1 kept, 0 out) rather than bool ones: on CPU, PyTorch's
# where/masked_fill on a random bool mask cost about 15 times a vectorized
# multiply; comparisons written into a float tensor and multiplies stay
# vectorized (the torch backend's tile loop). The reference takes them as bools.
def _kept(s: Tensor, i0: int, j0: int, rules: tuple, scratch: list[Tensor]):
    """(keep_row, keep_col): float masks of the tile ``s``, 1 where an entry stays in
    its row's (column's) logsumexp, 0 where it leaves; None where all stay.
    ``scratch``: three tiles of ``s``'s shape to write them into."""
    exclude_diagonal, positives, row_groups, col_groups, row_threshold, col_threshold = rules
    r, c = s.shape
    common_buf, row_buf, col_buf = scratch
    common = None
    if row_groups is not None:
        common = torch.ne(row_groups[i0:i0 + r].unsqueeze(1), col_groups[j0:j0 + c].unsqueeze(0),
                          out=common_buf)
    if exclude_diagonal:
        first, last = max(i0, j0), min(i0 + r, j0 + c)
        if first < last:
            if common is None:
                common = common_buf.fill_(1.0)
            diagonal = torch.arange(first, last, device=s.device)
            common[diagonal - i0, diagonal - j0] = 0.0
    keep_row = keep_col = common
    if row_threshold is not None:  # keep = 1 - (s > t): a NaN logit stays, as in ``excluded``
        keep_row = torch.gt(s, row_threshold[i0:i0 + r].unsqueeze(1), out=row_buf).neg_().add_(1.0)
        if common is not None:
            keep_row.mul_(common)
    if col_threshold is not None:
        keep_col = torch.gt(s, col_threshold[j0:j0 + c].unsqueeze(0), out=col_buf).neg_().add_(1.0)
        if common is not None:
            keep_col.mul_(common)
    column = positives[i0:i0 + r] - j0
    inside = ((column >= 0) & (column < c)).unsqueeze(1)
    column = column.clamp(0, c - 1).unsqueeze(1)
    for mask in {id(m): m for m in (keep_row, keep_col) if m is not None}.values():
        mask.scatter_(1, column, torch.where(inside, 1.0, mask.gather(1, column)))
    return keep_row, keep_col


# --- reference (the naive backend) ---------------------------------------------

def _empty_safe_lse(s: Tensor, out: Optional[Tensor], dim: int) -> Tensor:
    """logsumexp of ``s`` along ``dim`` without the entries ``out``; -inf with a zero
    gradient (not NaN) where every entry is out."""
    if out is None:
        return torch.logsumexp(s, dim)
    empty = out.all(dim, keepdim=True)
    kept = s.masked_fill(out, float("-inf")).masked_fill(empty, 0.0)
    return torch.logsumexp(kept, dim).masked_fill(empty.squeeze(dim), float("-inf"))


def _excluded(s: Tensor, rules: tuple):
    """(out_of_row, out_of_col): bool masks of the whole S, True where an entry leaves
    its row's (column's) logsumexp; None where nothing does."""
    keep = _kept(s, 0, 0, rules, [torch.empty_like(s) for _ in range(3)])
    return tuple(None if k is None else k == 0 for k in keep)


def lse_reference(a, b, scale, normalize, *rules):
    """The masked primitive on the materialized S, differentiable by plain autograd."""
    ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
    s = scale * (ah @ bh.T)
    out_of_row, out_of_col = _excluded(s.detach(), rules)
    return _empty_safe_lse(s, out_of_row, 1), _empty_safe_lse(s, out_of_col, 0)


def fwd_reference(a, b, scale, normalize, *rules):
    with torch.no_grad():
        return lse_reference(a, b, scale, normalize, *rules)


def bwd_reference(a, b, scale, normalize, *args):
    rules, (row_lse, col_lse, g_row, g_col, compute_pb, compute_pa) = args[:6], args[6:]
    with torch.no_grad():
        ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
        s = scale * (ah @ bh.T)
        out_of_row, out_of_col = _excluded(s, rules)
        # P = g_row * exp(S - row_lse) + g_col * exp(S - col_lse), 0 where excluded
        row_part = (s - row_lse.unsqueeze(1)).exp()
        col_part = (s - col_lse).exp()
        if out_of_row is not None:
            row_part.masked_fill_(out_of_row, 0.0)
        if out_of_col is not None:
            col_part.masked_fill_(out_of_col, 0.0)
        p = row_part * g_row.unsqueeze(1) + col_part * g_col
        return (p @ bh if compute_pb else ah.new_empty(0),
                p.T @ ah if compute_pa else ah.new_empty(0))


# --- autograd and fake kernels, shared by every backend ---------------------------

def _fwd_fake(a, b, scale, normalize, *rules):
    dtype = _checks.compute_dtype(a.dtype)
    return a.new_empty(a.shape[0], dtype=dtype), b.new_empty(b.shape[0], dtype=dtype)


def _bwd_fake(a, b, scale, normalize, *args):
    compute_pb, compute_pa = args[-2:]
    dtype = _checks.compute_dtype(a.dtype)
    return (a.new_empty(a.shape if compute_pb else (0,), dtype=dtype),
            b.new_empty(b.shape if compute_pa else (0,), dtype=dtype))


def _setup_context(ctx, inputs, output):
    a, b, scale, normalize, exclude_diagonal = inputs[:5]
    ctx.save_for_backward(a, b, scale, *output, *inputs[5:])
    ctx.normalize, ctx.exclude_diagonal = normalize, exclude_diagonal


def _backward_through(bwd_op):
    def backward(ctx, g_row, g_col):
        a, b, scale, row_lse, col_lse, *tensors = ctx.saved_tensors
        g_row = torch.zeros_like(row_lse) if g_row is None else g_row.contiguous()
        g_col = torch.zeros_like(col_lse) if g_col is None else g_col.contiguous()
        needs_a, needs_b, needs_scale = ctx.needs_input_grad[:3]
        compute_pb = needs_a or (needs_scale and not needs_b)  # the scale takes either
        pb, pa = bwd_op(a, b, scale, ctx.normalize, ctx.exclude_diagonal, *tensors,
                        row_lse, col_lse, g_row, g_col, compute_pb, needs_b)
        pb, pa = (pb if compute_pb else None), (pa if needs_b else None)
        grads = _common.grads_from_products(a, b, scale, ctx.normalize, pb, pa,
                                            ctx.needs_input_grad)
        return (*grads, None, None, None, None, None, None, None)

    return backward


KERNELS = KernelTable("masked similarity_logsumexp", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                      setup_context=_setup_context, backward=_backward_through)
KERNELS.register("naive", fwd_reference, bwd_reference, autograd=False)


# --- torch backend: tiled pure PyTorch --------------------------------------------

# The N x M x D products the torch backward computed ("S", "pb", "pa"), one count per
# call: how a test sees that a frozen side costs no gradient product.
PRODUCTS_COMPUTED: collections.Counter = collections.Counter()


_FAR = 1e30  # added below an excluded logit for the maximum: far under any logit
_EXP_CAP = 80.0  # exp(80) < fp32's max: an excluded entry's exp stays finite before its 0


def _merge_masked_stats(run_max: Tensor, run_sum: Tensor, s: Tensor, keep: Optional[Tensor],
                        dim: int, work: Tensor):
    """Fold a tile of S, only its entries ``keep``, into running (max, sum-of-exp)
    statistics along ``dim``; a statistic with nothing kept so far keeps max -inf
    and sum 0. ``work``: a scratch tile (``s`` is left as it is)."""
    if keep is None:
        tile_max = s.amax(dim)
    else:  # s where kept, s - _FAR (exactly -_FAR in fp32) where not
        tile_max = torch.sub(keep, 1.0, out=work).mul_(_FAR).addcmul_(s, keep).amax(dim)
        tile_max.masked_fill_(tile_max < -_FAR / 2, float("-inf"))
    new_max = torch.maximum(run_max, tile_max)
    shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
    exps = torch.sub(s, shift.unsqueeze(dim), out=work)
    if keep is not None:
        exps.clamp_max_(_EXP_CAP).exp_().mul_(keep)
    else:
        exps.exp_()
    run_sum.mul_(torch.exp(run_max - shift)).add_(exps.sum(dim))
    run_max.copy_(new_max)


@torch.library.custom_op("mmkernels::torch_masked_lse_fwd", mutates_args=())
def _torch_masked_lse_fwd(a: Tensor, b: Tensor, scale: Tensor, normalize: bool,
                          exclude_diagonal: bool, positives: Tensor,
                          row_groups: Optional[Tensor], col_groups: Optional[Tensor],
                          row_threshold: Optional[Tensor],
                          col_threshold: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    rules = (exclude_diagonal, positives, row_groups, col_groups, row_threshold, col_threshold)
    ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
    alpha = scale.item()
    n, m = ah.shape[0], bh.shape[0]
    row_max, row_sum = ah.new_full((n,), float("-inf")), ah.new_zeros(n)
    col_max, col_sum = ah.new_full((m,), float("-inf")), ah.new_zeros(m)
    buffers = TileBuffers(5, ah, n, m)
    for i0, i1, j0, j1 in tiles(n, m, ah.device):
        s, work, *scratch = buffers.views(i1 - i0, j1 - j0)
        torch.addmm(s, ah[i0:i1], bh[j0:j1].T, beta=0, alpha=alpha, out=s)
        keep_row, keep_col = _kept(s, i0, j0, rules, scratch)
        _merge_masked_stats(row_max[i0:i1], row_sum[i0:i1], s, keep_row, 1, work)
        _merge_masked_stats(col_max[j0:j1], col_sum[j0:j1], s, keep_col, 0, work)
    return row_max + row_sum.log(), col_max + col_sum.log()


@torch.library.custom_op("mmkernels::torch_masked_lse_bwd", mutates_args=())
def _torch_masked_lse_bwd(a: Tensor, b: Tensor, scale: Tensor, normalize: bool,
                          exclude_diagonal: bool, positives: Tensor,
                          row_groups: Optional[Tensor], col_groups: Optional[Tensor],
                          row_threshold: Optional[Tensor], col_threshold: Optional[Tensor],
                          row_lse: Tensor, col_lse: Tensor, g_row: Tensor, g_col: Tensor,
                          compute_pb: bool, compute_pa: bool) -> tuple[Tensor, Tensor]:
    rules = (exclude_diagonal, positives, row_groups, col_groups, row_threshold, col_threshold)
    ah, bh = scaled_operand(a, normalize), scaled_operand(b, normalize)
    alpha = scale.item()
    n, m = ah.shape[0], bh.shape[0]
    pb = torch.zeros_like(ah) if compute_pb else ah.new_empty(0)
    pa = torch.zeros_like(bh) if compute_pa else ah.new_empty(0)
    PRODUCTS_COMPUTED.update(["S"] + ["pb"] * compute_pb + ["pa"] * compute_pa)
    buffers = TileBuffers(5, ah, n, m)
    for i0, i1, j0, j1 in tiles(n, m, ah.device):
        s, p, *scratch = buffers.views(i1 - i0, j1 - j0)
        # The forward's S, bit for bit: the same addmm on the same tile.
        torch.addmm(s, ah[i0:i1], bh[j0:j1].T, beta=0, alpha=alpha, out=s)
        keep_row, keep_col = _kept(s, i0, j0, rules, scratch)
        # P = keep_row * g_row * exp(S - row_lse) + keep_col * g_col * exp(S - col_lse);
        # the cap keeps an excluded entry's exp finite (a -inf lse: all excluded).
        torch.sub(s, row_lse[i0:i1].unsqueeze(1), out=p).clamp_max_(_EXP_CAP).exp_()
        if keep_row is not None:
            p.mul_(keep_row)
        p.mul_(g_row[i0:i1].unsqueeze(1))
        s.sub_(col_lse[j0:j1]).clamp_max_(_EXP_CAP).exp_()
        if keep_col is not None:
            s.mul_(keep_col)
        p.addcmul_(s, g_col[j0:j1])
        if compute_pb:
            pb[i0:i1].addmm_(p, bh[j0:j1])
        if compute_pa:
            pa[j0:j1].addmm_(p.T, ah[i0:i1])
    return pb, pa


KERNELS.register("torch", _torch_masked_lse_fwd, _torch_masked_lse_bwd)


# --- dispatch ------------------------------------------------------------------------

def masked_backend(backend: str, device: torch.device) -> str:
    """The backend that runs the masked primitive for ``backend`` on ``device``.
    "auto" (with no override in the environment) takes the first backend of the
    auto order that has masked kernels; a named backend without them raises."""
    name = backends.select_backend(backend, device)
    if name in KERNELS:
        return name
    if backend == "auto" and os.environ.get(backends.ENV_VAR, "auto") in ("", "auto"):
        for candidate in backends.AUTO_ORDER.get(device.type, ()) + ("torch",):
            if candidate in KERNELS and backends.why_unavailable(candidate, device) is None:
                return candidate
    have = ", ".join(repr(n) for n, _ in KERNELS.items())
    raise RuntimeError(
        f"backend {name!r} has no kernels for similarity_logsumexp with exclusions "
        f"(exclude_diagonal, groups, thresholds) yet; backends that have them: {have}")


def masked_lse(a: Tensor, b: Tensor, scale: Tensor, normalize: bool, rules: Exclusions,
               backend: str):
    """The masked primitive on a resolved backend, for checked inputs. Differentiable."""
    if backend == "naive":
        return lse_reference(a, b, scale, normalize, *rules.as_args())
    fwd, _ = KERNELS.kernels(backend, a.device)
    return fwd(a, b, scale, normalize, *rules.as_args())
