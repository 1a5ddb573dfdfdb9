"""Independent reference for SigLIP's sigmoid loss, written from its definition in
docs/api.md with plain PyTorch on the materialized matrix (no mmkernels code)."""

import torch
import torch.nn.functional as F

from reference import logits


def siglip_rows(a, b, scale=1.0, bias=0.0, normalize=False):
    """Per-row losses ``-sum_j logsigmoid(z_ij * (S_ij + bias))``, z = 2 * eye - 1."""
    x = logits(a, b, scale, normalize) + bias
    z = 2 * torch.eye(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device) - 1
    return -F.logsigmoid(z * x).sum(1)


def siglip(a, b, scale=1.0, bias=0.0, normalize=False, reduction="mean"):
    rows = siglip_rows(a, b, scale, bias, normalize)
    return {"mean": lambda: rows.sum() / rows.shape[0], "sum": rows.sum, "none": lambda: rows}[reduction]()
