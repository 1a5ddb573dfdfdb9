r"""One contrastive training step, optionally with gradient caching.

Maths (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup")
-------------------------------------------------------------------------------
The loss L(f, g, s) of a batch depends on the encoders' parameters only
through the embeddings ``f = F(images)``, ``g = G(tokens)`` (N x D each) and
on the logit scale s directly. By the chain rule::

    dL/dtheta = sum_chunks  (dL/df_chunk) . (d f_chunk / d theta)   (+ the same for g)

so the gradient splits in three passes that never hold more than one
micro-batch of encoder activations:

1. embeddings of every micro-batch, without autograd (no activations kept);
2. the loss on the detached embeddings, which require grad: its backward
   gives ``dL/df``, ``dL/dg`` (N x D, O(N*D) memory with the tiled loss) and
   ``dL/ds`` directly;
3. each micro-batch encoded again with autograd, and back-propagated with
   its slice of ``dL/df`` as the upstream gradient; parameter gradients
   accumulate over the chunks.

Pass 3 must recompute exactly the embeddings of pass 1, so the random state
(dropout) before each chunk's pass-1 forward is recorded and replayed; the
state after pass 1 is restored at the end, so training continues from the
same state whether or not a step was chunked. With no randomness in the
model (CLIP has none by default), the gradients equal those of the whole
batch at once to fp32 round-off, whatever the micro-batch.

Memory: O(micro_batch) activations + O(N*D) embeddings and their gradients,
plus what the loss needs (O(N*D) for the tiled mmkernels backends, O(N^2)
for the naive one). Cost: one extra forward of both encoders.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def rng_state(device: torch.device) -> dict:
    """The global random state that dropout draws from: CPU and, for a CUDA
    device, that GPU's generator (what a checkpoint stores, per rank)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore a :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def encode_pair(model, images: Tensor, tokens: Tensor, autocast=contextlib.nullcontext):
    """Normalized fp32 image and text embeddings (under ``autocast``)."""
    with autocast():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
    return image_features.float(), text_features.float()


def contrastive_step(model, images: Tensor, tokens: Tensor, loss_fn: LossFn,
                     micro_batch: int | None = None, autocast=contextlib.nullcontext) -> Tensor:
    """Forward and backward of one contrastive batch; gradients accumulate in
    the parameters' ``.grad``. Returns the loss (detached).

    Args:
        model: a CLIP (``encode_image``, ``encode_text``, ``scale()``).
        images, tokens: the batch, (N, 3, S, S) and (N, L).
        loss_fn: ``loss_fn(image_features, text_features, logit_scale)``,
            e.g. ``mmkernels.contrastive_loss``.
        micro_batch: encoder chunk for gradient caching; None or >= N runs
            the whole batch through autograd at once.
        autocast: a context manager factory for the encoders (bf16 on GPU).
    """
    n = images.shape[0]
    if tokens.shape[0] != n:
        raise ValueError(f"tokens: expected {n} rows like images, got {tuple(tokens.shape)}")
    if micro_batch is None or micro_batch >= n:
        image_features, text_features = encode_pair(model, images, tokens, autocast)
        loss = loss_fn(image_features, text_features, model.scale())
        loss.backward()
        return loss.detach()

    spans = _spans(n, micro_batch)
    device = images.device
    # Pass 1: embeddings without autograd, recording the random state of each forward.
    image_states, text_states, image_parts, text_parts = [], [], [], []
    with torch.no_grad():
        for a, b in spans:
            image_states.append(rng_state(device))
            with autocast():
                image_parts.append(model.encode_image(images[a:b], normalize=True).float())
        for a, b in spans:
            text_states.append(rng_state(device))
            with autocast():
                text_parts.append(model.encode_text(tokens[a:b], normalize=True).float())
    state_after = rng_state(device)
    image_features = torch.cat(image_parts).requires_grad_()
    text_features = torch.cat(text_parts).requires_grad_()
    del image_parts, text_parts

    # Pass 2: the loss and its gradients w.r.t. the embeddings (and the logit scale).
    loss = loss_fn(image_features, text_features, model.scale())
    loss.backward()
    image_grad, text_grad = image_features.grad, text_features.grad
    del image_features, text_features

    # Pass 3: each chunk again with autograd, seeded with its embedding gradient.
    for (a, b), state in zip(spans, image_states):
        set_rng_state(state, device)
        with autocast():
            out = model.encode_image(images[a:b], normalize=True).float()
        out.backward(image_grad[a:b])
    for (a, b), state in zip(spans, text_states):
        set_rng_state(state, device)
        with autocast():
            out = model.encode_text(tokens[a:b], normalize=True).float()
        out.backward(text_grad[a:b])
    set_rng_state(state_after, device)
    return loss.detach()
