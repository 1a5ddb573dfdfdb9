"""Evaluation of a CLIP: retrieval recall@k both ways and zero-shot accuracy.

Retrieval over an evaluation set of N image-caption pairs: each image ranks
all N captions by cosine similarity (image-to-text) and each caption ranks
all N images (text-to-image). A query scores a hit at k when one of its k
nearest items belongs to its group (the same image, or for the synthetic
data the same described scene), so duplicates count as right answers. The
chance level of recall@1 (a random ranking) is the mean of
group_size / N, reported as ``chance_recall@1``. Similarities are computed in
row blocks, so the N x N matrix is never held.

Zero-shot classification (CLIP's recipe): each class is the normalized mean
of the embeddings of its prompts; an image is assigned the class of highest
cosine similarity.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

RECALL_AT = (1, 5, 10)


@torch.no_grad()
def _encode(encode, inputs: Tensor, chunk: int, device, autocast) -> Tensor:
    """Normalized fp32 embeddings of ``inputs`` by ``encode``, ``chunk`` rows at a time."""
    parts = []
    for i in range(0, inputs.shape[0], chunk):
        with autocast():
            parts.append(encode(inputs[i:i + chunk].to(device), normalize=True).float())
    return torch.cat(parts)


def encode_images(model, images: Tensor, chunk: int, device, autocast=contextlib.nullcontext) -> Tensor:
    return _encode(model.encode_image, images, chunk, device, autocast)


def encode_texts(model, tokens: Tensor, chunk: int, device, autocast=contextlib.nullcontext) -> Tensor:
    return _encode(model.encode_text, tokens, chunk, device, autocast)


def _recall(queries: Tensor, keys: Tensor, groups: Tensor, ks=RECALL_AT, block: int = 1024) -> dict:
    """Fraction of queries with an item of their group among the k nearest keys."""
    kmax = min(max(ks), keys.shape[0])
    hits = {k: 0 for k in ks}
    groups = groups.to(queries.device)
    for i in range(0, queries.shape[0], block):
        top = (queries[i:i + block] @ keys.T).topk(kmax, dim=1).indices
        match = groups[top] == groups[i:i + block, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(dim=1).sum())
    return {k: hits[k] / queries.shape[0] for k in ks}


def retrieval_metrics(image_features: Tensor, text_features: Tensor, groups: Tensor) -> dict:
    """Recall@1/5/10 image-to-text and text-to-image, and the chance recall@1."""
    out = {}
    for name, (q, k) in (("i2t", (image_features, text_features)),
                         ("t2i", (text_features, image_features))):
        for at, value in _recall(q, k, groups).items():
            out[f"{name}_recall@{at}"] = value
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    out["chance_recall@1"] = float(counts[inverse].float().mean() / groups.numel())
    return out


@torch.no_grad()
def zeroshot_accuracy(model, image_features: Tensor, task: dict, tokenizer, chunk: int, device,
                      autocast=contextlib.nullcontext, cache: dict | None = None) -> float:
    """Accuracy of prompt-ensembled zero-shot classification (``task``: classes,
    prompts per class, labels per image). ``cache`` maps prompt -> embedding."""
    cache = {} if cache is None else cache
    todo = sorted({p for prompts in task["prompts"] for p in prompts if p not in cache})
    for i in range(0, len(todo), chunk):
        batch = todo[i:i + chunk]
        for prompt, feature in zip(batch, encode_texts(model, tokenizer(batch), chunk, device, autocast)):
            cache[prompt] = feature
    classes = torch.stack([F.normalize(torch.stack([cache[p] for p in prompts]).mean(0), dim=0)
                           for prompts in task["prompts"]])
    predicted = (image_features @ classes.T).argmax(dim=1).cpu()
    return float((predicted == torch.tensor(task["labels"])).float().mean())


def evaluate(model, eval_set: dict, tokenizer, device, autocast=contextlib.nullcontext,
             chunk: int = 512) -> dict:
    """All metrics on ``eval_set`` (images, tokens, groups, zeroshot tasks)."""
    was_training = model.training
    model.eval()
    try:
        image_features = encode_images(model, eval_set["images"], chunk, device, autocast)
        text_features = encode_texts(model, eval_set["tokens"], chunk, device, autocast)
        metrics = retrieval_metrics(image_features, text_features, eval_set["groups"])
        cache: dict = {}
        for task in eval_set.get("zeroshot", []):
            metrics[f"zeroshot_{task['name']}"] = zeroshot_accuracy(
                model, image_features, task, tokenizer, chunk, device, autocast, cache)
    finally:
        model.train(was_training)
    return metrics
