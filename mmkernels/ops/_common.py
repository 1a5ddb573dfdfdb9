"""Pieces shared by the op modules: normalization, its backward, the epilogue
that turns a kernel's products into gradients, and the tiling of the torch
backend.

Notation (docs/architecture.md, "The primitive"): ``ra[i] = 1 / max(||a_i||, eps)`` when
normalizing, else 1; ``Ah = ra * a`` (rows scaled), likewise ``Bh``; and
``S = scale * Ah @ Bh.T``. A backward kernel returns the two products

    pb = P @ Bh   (N, D)        pa = P.T @ Ah   (M, D)

of the upstream gradient ``P = dL/dS`` (never held whole by tiled backends)
with the scaled operands, in the compute dtype. Everything else is O(N*D)
and done here, once, for every backend:

    dL/dAh = scale * pb      dL/dBh = scale * pa      dL/dscale = sum_i <Ah_i, pb_i>

(the scale gradient comes out of pb, with no extra pass over S, and without
dividing by scale, so scale = 0 is fine), followed by the backward of the
normalization.
"""

from __future__ import annotations

import torch

from mmkernels._checks import compute_dtype

# F.normalize's eps (docs/api.md): rows with a smaller norm are divided by EPS instead.
EPS = 1e-12


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row, in the compute dtype (no copy of x in that dtype)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype))


def inv_norms(x: torch.Tensor) -> torch.Tensor:
    """``1 / max(||x_i||, eps)`` per row, in the compute dtype: F.normalize's factor."""
    return row_norms(x).clamp_min(EPS).reciprocal()


def scaled_operand(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``x`` (normalized when asked) as a contiguous tensor in the compute dtype."""
    out = x.to(compute_dtype(x.dtype))
    if normalize:
        out = out * inv_norms(x).unsqueeze(1)
    return out.contiguous()


def normalization_backward(x: torch.Tensor, grad_xh: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. ``x`` of ``xh = x / max(||x||, eps)``, given ``grad_xh`` (consumed:
    it is overwritten, so the backward allocates no N x D temporary for fp32 inputs).

    With ``r = 1 / ||x||``: ``g * r - x * r^3 <x, g>`` for rows with norm > eps,
    ``g / eps`` for clamped rows. Computed in grad_xh's dtype (fp32/fp64) and
    cast to x's dtype once, so the two terms cancel in full precision.
    """
    xc = x.to(grad_xh.dtype)
    norms = torch.linalg.vector_norm(xc, dim=1)
    r = norms.clamp_min(EPS).reciprocal()
    along = torch.linalg.vecdot(xc, grad_xh) * r * r
    along = torch.where(norms > EPS, along, torch.zeros_like(along))
    grad_xh.addcmul_(xc, along.unsqueeze(1), value=-1.0).mul_(r.unsqueeze(1))
    return grad_xh.to(x.dtype)


def grads_from_products(a, b, scale, normalize, pb, pa, needs_input_grad):
    """(grad_a, grad_b, grad_scale) from a backward kernel's products pb, pa (consumed).

    Either product may be None when its side needs no gradient (a frozen tower):
    the scale's gradient, sum_i <Ah_i, pb_i> = sum_j <Bh_j, pa_j>, takes the one there."""
    needs_a, needs_b, needs_scale = needs_input_grad[:3]
    grad_scale = None
    if needs_scale:  # before the product is overwritten
        x, product = (a, pb) if pb is not None else (b, pa)
        along = torch.linalg.vecdot(x.to(product.dtype), product)
        if normalize:
            along = along * inv_norms(x)
        grad_scale = along.sum()
    grad_a = _feature_grad(a, pb.mul_(scale), normalize) if needs_a else None
    grad_b = _feature_grad(b, pa.mul_(scale), normalize) if needs_b else None
    return grad_a, grad_b, grad_scale


def _feature_grad(x: torch.Tensor, grad_xh: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Gradient w.r.t. the raw features ``x`` from the gradient w.r.t. the (scaled) operand."""
    if normalize:
        return normalization_backward(x, grad_xh)
    return grad_xh.to(x.dtype)


# --- tiling of the torch backend --------------------------------------------

# Tile edges (rows of A, rows of B) per device type. CPU: 1024 x 1024 fp32
# logits (4 MiB, in L3) gave the best fwd+bwd time of the shapes tried from
# 128 x 4096 to 2048 x 2048 on the 2-core development machine (N = 8192,
# D = 512): large enough for MKL to run the tile matmuls near its full rate,
# small enough that the elementwise passes over a tile hit cache. GPU: large
# enough that launch overhead vanishes, small next to the inputs (64 MiB).
TILE_SHAPE = {
    "cpu": (1024, 1024),
    "cuda": (4096, 4096),
}
DEFAULT_TILE_SHAPE = (1024, 4096)


def tile_shape(device: torch.device) -> tuple[int, int]:
    return TILE_SHAPE.get(device.type, DEFAULT_TILE_SHAPE)


def tiles(rows: int, cols: int, device: torch.device):
    """Yield (i0, i1, j0, j1) of the tiles covering a rows x cols matrix, row blocks outer."""
    tm, tn = tile_shape(device)
    for i0 in range(0, rows, tm):
        for j0 in range(0, cols, tn):
            yield i0, min(i0 + tm, rows), j0, min(j0 + tn, cols)


class TileBuffers:
    """Reusable scratch tiles, so the loops allocate nothing per tile."""

    def __init__(self, count: int, like: torch.Tensor, rows: int, cols: int):
        tm, tn = tile_shape(like.device)
        size = min(tm, rows) * min(tn, cols)
        self._flat = [like.new_empty(size) for _ in range(count)]

    def views(self, rows: int, cols: int):
        """Contiguous (rows, cols) views of each buffer."""
        return [flat[: rows * cols].view(rows, cols) for flat in self._flat]
