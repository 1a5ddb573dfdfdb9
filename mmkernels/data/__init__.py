"""Image-caption data: the built-in synthetic dataset, CSV/TSV/JSONL files,
Pillow transforms and the deterministic batch loader.

:func:`open_dataset` turns the trainer's ``--data`` value into a dataset:
"synthetic" (the default: drawn shapes and their descriptions, no download)
or the path of a CSV/TSV/JSONL file of image paths and captions. A dataset
has ``len()``, ``load(index, rng) -> (image tensor, caption)``,
``caption(index)`` and ``group(index)`` (items of one group are equally
right answers in retrieval); the synthetic one also ``zeroshot_tasks``.
"""

from __future__ import annotations

from mmkernels.data.files import CaptionFileDataset, SampleError
from mmkernels.data.loader import Batch, BatchFetcher, batches, load_items
from mmkernels.data.synthetic import SyntheticShapes

SYNTHETIC = "synthetic"


def open_dataset(spec: str, *, image_size: int, train: bool, seed: int = 0,
                 synthetic_size: int | None = None, image_key: str | None = None,
                 caption_key: str | None = None, separator: str | None = None):
    """The dataset named by ``spec``: "synthetic" or a CSV/TSV/JSONL path.

    ``train`` picks the synthetic split ("train" / "val") and, for files,
    random crops versus center crops. ``synthetic_size`` sets the number of
    synthetic items (default: 1,000,000 for train, 1000 for val).
    """
    if spec == SYNTHETIC:
        size = synthetic_size or (1_000_000 if train else 1000)
        return SyntheticShapes("train" if train else "val", size=size, image_size=image_size, seed=seed)
    return CaptionFileDataset(spec, image_size, train=train, image_key=image_key,
                              caption_key=caption_key, separator=separator)


__all__ = ["Batch", "BatchFetcher", "CaptionFileDataset", "SampleError", "SyntheticShapes",
           "batches", "load_items", "open_dataset"]
