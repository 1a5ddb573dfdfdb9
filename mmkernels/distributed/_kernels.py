"""The tile kernels the distributed rings run, looked up in one place."""

from __future__ import annotations

import torch

from mmkernels.ops import logsumexp as _lse
from mmkernels.ops import masked_logsumexp as _masked
from mmkernels.ops import siglip as _siglip

_TABLES = {"logsumexp": _lse.KERNELS, "siglip": _siglip.KERNELS}


def ring_kernels(op: str, name: str, device: torch.device) -> tuple:
    """(fwd, bwd) obeying ``op``'s kernel contract ("logsumexp" or "siglip") on the
    resolved backend ``name`` (the op's kernel table raises if it has none); the
    primitive's bwd takes two more arguments, see :func:`lse_backward`."""
    fwd, bwd = _TABLES[op].kernels(name, device)
    return (fwd, lse_backward(name, device, bwd)) if op == "logsumexp" else (fwd, bwd)


def lse_backward(name: str, device: torch.device, plain_bwd):
    """The primitive's backward as ``bwd(a, b, scale, normalize, row_lse, col_lse, g_row,
    g_col, compute_pb, compute_pa) -> (pb, pa)``: the masked family's kernels with no
    rule on where backend ``name`` has them (a product not asked for is not computed:
    a frozen side), else ``plain_bwd``, which computes both."""
    if name not in _masked.KERNELS:
        def bwd(a, b, scale, normalize, row_lse, col_lse, g_row, g_col, compute_pb, compute_pa):
            return plain_bwd(a, b, scale, normalize, row_lse, col_lse, g_row, g_col)
        return bwd
    _, masked_bwd = _masked.KERNELS.kernels(name, device)

    def bwd(a, b, scale, normalize, row_lse, col_lse, g_row, g_col, compute_pb, compute_pa):
        no_rule = _masked.Exclusions.none(a).as_args()
        return masked_bwd(a, b, scale, normalize, *no_rule, row_lse, col_lse, g_row, g_col,
                          compute_pb, compute_pa)
    return bwd
