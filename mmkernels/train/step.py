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
   its slice of ``dL/df`` and ``dL/dg`` as the upstream gradients; parameter
   gradients accumulate over the chunks.

Pass 3 must recompute exactly the embeddings of pass 1, so the random state
(dropout) before each chunk's pass-1 forward is recorded and replayed; the
state after pass 1 is restored at the end, so training continues from the
same state whether or not a step was chunked. With no randomness in the
model (CLIP has none by default), the gradients equal those of the whole
batch at once to fp32 round-off, whatever the micro-batch.

Each pass runs a chunk through both towers in one forward (``model(images,
tokens)``), so that under DistributedDataParallel every chunk is one DDP
forward and backward. The chunks but the last run under ``no_sync()``: their
gradients accumulate locally, and DDP all-reduces the sum once per step, in
the last chunk's backward, bucket by bucket as its gradients become ready
(overlapped with the rest of that backward).

The logit scale is the one parameter whose gradient comes from the loss, not
from the encoders' backward (with SigLIP's bias): pass 2 differentiates the
loss with respect to the scale's *value* (``exp(logit_scale)``, as the
forward of pass 1 returned it, detached), and the last chunk of pass 3
back-propagates that gradient through ``model.scale()``, which its forward
returns beside the embeddings. So the parameter receives its
gradient inside the synchronized backward, and DDP averages it in the same
buckets as the towers' (no collective of its own, and no unused parameter).

Memory: the activations of one micro-batch of pairs (both towers) + O(N*D)
embeddings and their gradients, plus what the loss needs (O(N*D) for the
tiled mmkernels backends, O(N^2) for the naive one). Cost: one extra forward
of both encoders.
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


def _module(model):
    """The CLIP inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def _without_gradient_sync(model):
    """Backward passes that accumulate gradients locally: DDP's ``no_sync()``,
    FSDP2's ``set_requires_gradient_sync(False)`` (its reduce-scatter deferred
    to the next synchronized backward), nothing for a plain model."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def encode_pair(model, images: Tensor, tokens: Tensor, autocast=contextlib.nullcontext):
    """Normalized fp32 image and text embeddings (under ``autocast``)."""
    with autocast():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
    return image_features.float(), text_features.float()


def _forward(model, images: Tensor, tokens: Tensor, autocast) -> tuple[Tensor, ...]:
    """``model(images, tokens)`` under ``autocast``: the fp32 features, then the
    loss's parameters (the scale; SigLIP's bias too), fp32."""
    with autocast():
        outputs = model(images, tokens)
    return tuple(t.float() for t in outputs)


def contrastive_step(model, images: Tensor, tokens: Tensor, loss_fn: LossFn,
                     micro_batch: int | None = None, autocast=contextlib.nullcontext) -> Tensor:
    """Forward and backward of one contrastive batch; gradients accumulate in
    the parameters' ``.grad``. Returns the loss (detached).

    Args:
        model: a CLIP (``model(images, tokens)`` returns the normalized image
            and text features and the logit multiplier ``scale()``, then any
            other parameter of the loss, such as SigLIP's bias), or a
            ``DistributedDataParallel`` of one, or one sharded by FSDP2's
            ``fully_shard``: its gradients are all-reduced (reduce-scattered)
            once, in the backward of the last micro-batch.
        images, tokens: the batch, (N, 3, S, S) and (N, L).
        loss_fn: ``loss_fn(image_features, text_features, logit_scale, ...)``
            (what the model returns), e.g. ``mmkernels.contrastive_loss``.
        micro_batch: encoder chunk for gradient caching; None or >= N runs
            the whole batch through autograd at once.
        autocast: a context manager factory for the encoders (bf16 on GPU).
    """
    n = images.shape[0]
    if tokens.shape[0] != n:
        raise ValueError(f"tokens: expected {n} rows like images, got {tuple(tokens.shape)}")
    if micro_batch is None or micro_batch >= n:
        loss = loss_fn(*_forward(model, images, tokens, autocast))
        loss.backward()
        return loss.detach()

    module = _module(model)
    spans = _spans(n, micro_batch)
    device = images.device
    # Pass 1: embeddings without autograd (no DDP: nothing to synchronize),
    # recording the random state before each chunk's forward.
    states, image_parts, text_parts = [], [], []
    with torch.no_grad():
        for a, b in spans:
            states.append(rng_state(device))
            image_part, text_part, *values = _forward(module, images[a:b], tokens[a:b], autocast)
            image_parts.append(image_part)
            text_parts.append(text_part)
    state_after = rng_state(device)
    image_features = torch.cat(image_parts).requires_grad_()
    text_features = torch.cat(text_parts).requires_grad_()
    del image_parts, text_parts
    # The values of the scale (and bias) as leaves: their gradients wait for the
    # last chunk of pass 3, whose forward recomputes them from the parameters.
    values = [v.detach().requires_grad_() for v in values]

    # Pass 2: the loss and its gradients w.r.t. the embeddings and those values.
    loss = loss_fn(image_features, text_features, *values)
    loss.backward()
    image_grad, text_grad = image_features.grad, text_features.grad
    value_grads = [v.grad for v in values]
    del image_features, text_features, values

    # Pass 3: each chunk again with autograd, seeded with its embedding gradients;
    # the last one also carries the scale's (and bias'), and is the one DDP synchronizes.
    last = len(spans) - 1
    for i, ((a, b), state) in enumerate(zip(spans, states)):
        set_rng_state(state, device)
        with contextlib.nullcontext() if i == last else _without_gradient_sync(model):
            image_part, text_part, *values = _forward(model, images[a:b], tokens[a:b], autocast)
            outputs, grads = [image_part, text_part], [image_grad[a:b], text_grad[a:b]]
            if i == last:  # a frozen scale (no grad) stays out
                for value, grad in zip(values, value_grads):
                    if value.requires_grad and grad is not None:
                        outputs.append(value)
                        grads.append(grad)
            torch.autograd.backward(outputs, grads)
    set_rng_state(state_after, device)
    return loss.detach()
