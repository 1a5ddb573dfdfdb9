"""The tile kernels the distributed rings run, looked up in one place."""

from __future__ import annotations

from mmkernels import backends
from mmkernels.ops import logsumexp as _lse
from mmkernels.ops import siglip as _siglip


def ring_kernels(op: str, name: str, requested: str = "auto") -> tuple:
    """(fwd, bwd) obeying ``op``'s kernel contract ("logsumexp" or "siglip") on the
    resolved backend ``name``; ``requested``: the backend as the caller asked for it."""
    if op == "siglip":
        return _siglip.kernels(name, requested)
    if name not in _lse._KERNELS:
        backends.load_kernels(name)
    return _lse._KERNELS[name]
