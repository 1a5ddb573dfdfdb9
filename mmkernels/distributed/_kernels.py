"""The tile kernels the distributed rings run, looked up in one place."""

from __future__ import annotations

import torch

from mmkernels.ops import logsumexp as _lse
from mmkernels.ops import siglip as _siglip

_TABLES = {"logsumexp": _lse.KERNELS, "siglip": _siglip.KERNELS}


def ring_kernels(op: str, name: str, device: torch.device) -> tuple:
    """(fwd, bwd) obeying ``op``'s kernel contract ("logsumexp" or "siglip") on the
    resolved backend ``name`` (the op's kernel table raises if it has none)."""
    return _TABLES[op].kernels(name, device)
