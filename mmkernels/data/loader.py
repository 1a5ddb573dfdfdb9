"""Deterministic contrastive batches with a resumable position.

The data is one endless stream: stream position ``p`` is item
``perm_e[p mod n]`` of epoch ``e = p div n``, where ``perm_e`` is a random
permutation of the n items seeded by (seed, e). Global batch ``k`` covers
positions ``[k*B, (k+1)*B)``; with W processes, rank r loads the r-th
contiguous slice of it. Each item's augmentation draws from a generator
seeded by (seed, p). So a batch is a pure function of (seed, k): training
resumes exactly from the step alone, and any number of loader workers (or a
different micro-batch) sees the same data.

An item that cannot be loaded (:class:`~mmkernels.data.files.SampleError`:
missing or unreadable image) is left out of its batch and reported in the
batch's ``skipped`` list, never raised mid-epoch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmkernels.data.files import SampleError


@dataclass
class Batch:
    """One process's share of a global batch."""
    step: int
    images: Tensor                      # (b, 3, S, S) float32
    tokens: Tensor                      # (b, L) int64
    skipped: list = field(default_factory=list)   # (index, reason) of items left out


class _Permutations:
    """perm_e per epoch, computed on demand (the last one kept)."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = None, None

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[offset]


class BatchFetcher(torch.utils.data.Dataset):
    """``fetcher[k]`` is this rank's part of global batch k (a :class:`Batch`).

    A map-style dataset over step numbers, so that torch's DataLoader can
    prefetch batches in worker processes (``batch_size=None``).
    """

    def __init__(self, dataset, tokenizer, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, augment: bool = True):
        if batch_size % world_size:
            raise ValueError(f"batch_size: {batch_size} is not divisible by the {world_size} processes")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.augment = augment
        self._perms = _Permutations(len(dataset), seed, shuffle)

    def positions(self, step: int) -> range:
        local = self.batch_size // self.world_size
        start = step * self.batch_size + self.rank * local
        return range(start, start + local)

    def __getitem__(self, step: int) -> Batch:
        positions = self.positions(step)
        images, captions, skipped = None, [], []
        for p in positions:
            index = self._perms.index(p)
            rng = random.Random(f"mmkernels-augment/{self.seed}/{p}") if self.augment else None
            try:
                image, caption = self.dataset.load(index, rng)
            except SampleError as exc:
                skipped.append((index, str(exc)))
                continue
            if images is None:  # filled in place: no second copy of a large batch
                images = image.new_empty((len(positions), *image.shape))
            images[len(captions)] = image
            captions.append(caption)
        if captions:
            return Batch(step, images[:len(captions)], self.tokenizer(captions), skipped)
        return Batch(step, torch.empty(0), torch.empty(0, dtype=torch.long), skipped)

    def __len__(self) -> int:  # not used for sampling; steps come from the sampler
        return 2**62


def batches(fetcher: BatchFetcher, start_step: int, end_step: int, workers: int = 0,
            worker_init_fn=None):
    """Iterate this rank's batches ``start_step .. end_step - 1`` in order,
    prefetched by ``workers`` processes (0: in this process)."""
    if workers == 0:
        for step in range(start_step, end_step):
            yield fetcher[step]
        return
    # Its own generator: the loader's seed draw must not advance the global
    # random state (which the checkpoint restores for dropout).
    loader = torch.utils.data.DataLoader(fetcher, batch_size=None, sampler=range(start_step, end_step),
                                         num_workers=workers, prefetch_factor=2, collate_fn=_as_is,
                                         worker_init_fn=worker_init_fn, generator=torch.Generator())
    yield from loader


def _as_is(batch):
    return batch


def load_items(dataset, tokenizer, indices) -> tuple[Tensor, Tensor, list, list]:
    """Every item of ``indices`` (no augmentation): (images, tokens, kept
    indices, skipped (index, reason) pairs). For evaluation sets."""
    images, captions, kept, skipped = [], [], [], []
    for index in indices:
        try:
            image, caption = dataset.load(index, None)
        except SampleError as exc:
            skipped.append((index, str(exc)))
            continue
        images.append(image)
        captions.append(caption)
        kept.append(index)
    if not images:
        raise ValueError(f"data: none of the {len(indices)} evaluation items could be loaded; "
                         f"first error: {skipped[0][1] if skipped else 'no items'}")
    return torch.stack(images), tokenizer(captions), kept, skipped
