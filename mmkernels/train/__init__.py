"""Train a CLIP with the fused contrastive loss: ``python -m mmkernels.train``.

The recipe: image-caption pairs, a ViT image tower and a causal text
Transformer (mmkernels/models/clip.py), the symmetric contrastive loss of an
mmkernels backend (``--loss``), AdamW with linear warmup (5% of the steps,
at least 25) and cosine decay, bf16 autocast on GPU, then retrieval
(recall@1/5/10 both ways) and zero-shot evaluation. Default: the ``tiny``
model on the built-in synthetic data, which needs no download::

    python -m mmkernels.train --output runs/tiny

Batches bigger than memory: ``--batch-size`` is the contrastive batch (the
negatives each pair is scored against) and ``--micro-batch`` the chunk the
encoders run on. With a smaller micro-batch, gradient caching
(mmkernels/train/step.py) computes the same gradients as the whole batch at
once while holding one chunk of activations; the tiled loss itself holds
O(N*D), never the N x N logits. Same seed and data with any micro-batch give
the same parameters, to fp32 round-off.

Outputs in ``--output DIR``: ``metrics.jsonl`` (one JSON object per logged
step, ``"kind": "train"``, and per evaluation, ``"kind": "eval"``),
``last.pt`` (model, optimizer, scheduler, step, random state, data
position) and ``curves.png`` (loss and recall curves). The last line on
stdout is a JSON summary.

Preemption: on SIGTERM or SIGINT the step in flight finishes, ``last.pt`` is
written and the process exits with 128 + the signal number; run the same
command with ``--resume`` and it continues from there and ends with the same
parameters as a run that was never interrupted (the data stream, the
augmentations and the random state are functions of the step). An error
mid-run (unreadable data, a non-finite loss) also saves the last completed
step before it is raised.

A Hugging Face checkpoint: ``--hf-model DIR`` fine-tunes the ``CLIPModel``
or ``SiglipModel`` saved in DIR, with its processor, offline, and saves the
result with ``save_pretrained`` to ``OUTPUT/hf`` (mmkernels/train/hf.py).

Data-parallel: ``torchrun --nproc-per-node W -m mmkernels.train ...``
(mmkernels/train/parallel.py): the model in DistributedDataParallel, every
rank encodes 1/W of the batch and the loss is the global one; gradient
caching all-reduces once per step. ``--fsdp`` shards the model over the
ranks (FSDP2) instead of replicating it.
"""

from mmkernels.train.options import build_parser
from mmkernels.train.trainer import (CollapseWatch, DataError, Trainer, default_warmup, lr_lambda,
                                     main, make_optimizer)

__all__ = ["CollapseWatch", "DataError", "Trainer", "build_parser", "default_warmup", "lr_lambda",
           "main", "make_optimizer"]
