"""Pillow image transforms: resize, center / random-resized crop, normalize.

CLIP's preprocessing: training takes a random crop covering ``scale`` of the
image area (aspect ratio in ``ratio``) resized to the model's size;
evaluation resizes the shorter side to that size and takes the center crop.
Both end with ``(pixels / 255 - mean) / std`` with CLIP's channel statistics,
as a float32 (3, size, size) tensor. Random choices come from the
``random.Random`` passed in, so a sample's augmentation depends on its seed
alone (exact resume, any number of loader workers).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's normalization (open_clip's OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalized float32 (3, H, W) tensor."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return (pixels.permute(2, 0, 1).float().div_(255) - _MEAN) / _STD


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size`` (bicubic), keeping the aspect ratio."""
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            scale: tuple[float, float], ratio: tuple[float, float]):
    """(left, top, right, bottom) of a crop covering ``scale`` of the area with
    aspect ratio in ``ratio`` (log-uniform); the center square if 10 draws fail."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


class EvalTransform:
    """Resize the shorter side to ``size``, center crop, normalize."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return to_tensor(center_crop(resize_shorter(image, self.size), self.size))


class TrainTransform:
    """Random resized crop (area fraction ``scale``, aspect ``ratio``) to ``size``, normalize.

    Defaults follow open_clip's training transform (scale (0.9, 1.0)). Without
    an ``rng`` (evaluation), falls back to :class:`EvalTransform`.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio
        self._eval = EvalTransform(size)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if rng is None:
            return self._eval(image)
        box = random_resized_crop_box(*image.size, rng, self.scale, self.ratio)
        return to_tensor(image.resize((self.size, self.size), Image.BICUBIC, box=box))
