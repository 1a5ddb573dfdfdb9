"""Independent references, written from the definitions in docs/api.md with plain
PyTorch on the materialized matrix (no mmkernels code)."""

import torch
import torch.nn.functional as F


def logits(a, b, scale, normalize):
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return scale * a @ b.T


def contrastive(a, b, scale=1.0, normalize=False, label_smoothing=0.0, reduction="mean"):
    s = logits(a, b, scale, normalize)
    labels = torch.arange(s.shape[0], device=s.device)
    per_pair = (F.cross_entropy(s, labels, label_smoothing=label_smoothing, reduction="none")
                + F.cross_entropy(s.T, labels, label_smoothing=label_smoothing, reduction="none")) / 2
    return {"mean": per_pair.mean, "sum": per_pair.sum, "none": lambda: per_pair}[reduction]()


def info_nce(q, k, labels=None, scale=1.0, normalize=False, label_smoothing=0.0, reduction="mean"):
    s = logits(q, k, scale, normalize)
    if labels is None:
        labels = torch.arange(s.shape[0], device=s.device)
    return F.cross_entropy(s, labels, label_smoothing=label_smoothing, reduction=reduction)


def logsumexp(a, b, scale=1.0, normalize=False):
    s = logits(a, b, scale, normalize)
    return torch.logsumexp(s, dim=1), torch.logsumexp(s, dim=0)


def leaves(*tensors, dtype=None):
    """Detached copies that require grad (optionally cast)."""
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]
