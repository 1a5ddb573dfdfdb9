"""A built-in image-caption dataset: procedurally drawn shapes, described in words.

Each image holds one shape on a plain background; its caption names the
four attributes that decide how it is drawn::

    shape     circle, square, triangle, diamond, star, cross, hexagon     (7)
    colour    red, green, blue, yellow, purple, orange, white, black      (8)
    size      small, medium, large                                        (3)
    position  top left, top, top right, left, center, right, bottom ...   (9)

in one of several sentence templates ("a small red circle at the top left",
"at the top left there is a small red circle", ...). The background shade,
the exact position within the named ninth of the image and the exact hue
vary within each attribute, so a model has to read the attributes, not
memorise pixels. That is 1512 distinct descriptions ("groups"): retrieval
counts a hit when the retrieved item has the query's group, and the
zero-shot tasks classify each attribute by averaging the embeddings of every
caption that names a class (CLIP's prompt ensembling).

Item ``i`` of a split is drawn from a random generator seeded by
(split, seed, i) alone, so the data needs no storage, no download, and is
identical in every process.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from mmkernels.data.transforms import to_tensor

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
COLOURS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (240, 215, 40),
    "purple": (140, 55, 185), "orange": (245, 135, 30), "white": (248, 248, 248), "black": (15, 15, 15),
}
# Bounding-box side as a fraction of the image side.
SIZES = {"small": 0.24, "medium": 0.38, "large": 0.54}
# Name -> (column, row) of the ninth of the image that holds the shape's center.
POSITIONS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
ATTRIBUTES = ("shape", "colour", "size", "position")
TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "{where} there is a {size} {colour} {shape}",
    "a picture of a {size} {colour} {shape} {where}",
    "{size} {colour} {shape}, {where}",
)
_WHERE = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
          "left": "on the left", "center": "in the center", "right": "on the right",
          "bottom left": "at the bottom left", "bottom": "at the bottom",
          "bottom right": "at the bottom right"}
_VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS)}

SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(shape=self.shape, colour=self.colour, size=self.size,
                                          where=_WHERE[self.position])

    def group(self) -> int:
        """The scene's index among all 1512 attribute combinations."""
        index = 0
        for attr in ATTRIBUTES:
            values = _VALUES[attr]
            index = index * len(values) + values.index(getattr(self, attr))
        return index


def all_scenes() -> list[Scene]:
    return [Scene(*values) for values in itertools.product(*(_VALUES[a] for a in ATTRIBUTES))]


def _polygon(shape: str, cx: float, cy: float, r: float):
    """Vertices of the shape inscribed in the circle of radius r around (cx, cy)."""

    def ring(count, radius, phase):
        return [(cx + radius * math.cos(phase + 2 * math.pi * k / count),
                 cy + radius * math.sin(phase + 2 * math.pi * k / count)) for k in range(count)]

    if shape == "square":
        s = r * 0.8
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return ring(3, r, -math.pi / 2)
    if shape == "diamond":
        return ring(4, r, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.42, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = r * 0.32, r * 0.95
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw ``scene`` as an RGB image; ``rng`` picks the nuisance details."""
    side = image_size * SUPERSAMPLE
    grey = rng.randint(70, 185)
    background = tuple(min(255, max(0, grey + rng.randint(-12, 12))) for _ in range(3))
    image = Image.new("RGB", (side, side), background)
    colour = tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in COLOURS[scene.colour])
    r = SIZES[scene.size] * side / 2 * rng.uniform(0.92, 1.08)
    col, row = POSITIONS[scene.position]
    # Center in the named ninth, jittered, and kept inside the image.
    cx = min(max((col + 0.5 + rng.uniform(-0.18, 0.18)) * side / 3, r), side - r)
    cy = min(max((row + 0.5 + rng.uniform(-0.18, 0.18)) * side / 3, r), side - r)
    draw = ImageDraw.Draw(image)
    if scene.shape == "circle":
        draw.ellipse((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=colour)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=colour)
    return image.reduce(SUPERSAMPLE)


class SyntheticShapes:
    """The synthetic image-caption dataset (see the module docstring).

    Args:
        split: "train" or "val" (independent streams of items).
        size: number of items.
        image_size: side of the square images.
        seed: varies the items of both splits.
    """

    def __init__(self, split: str = "train", size: int = 1_000_000, image_size: int = 32,
                 seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        if size < 1:
            raise ValueError(f"size: expected a positive number of items, got {size}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"mmkernels-synthetic/{self.split}/{self.seed}/{index}")

    def _item(self, index: int) -> tuple[Scene, int, random.Random]:
        """The scene, the caption template and the generator for the nuisance details."""
        rng = self._rng(index)
        scene = Scene(*(rng.choice(_VALUES[a]) for a in ATTRIBUTES))
        return scene, rng.randrange(len(TEMPLATES)), rng

    def scene(self, index: int) -> Scene:
        return self._item(index)[0]

    def caption(self, index: int) -> str:
        scene, template, _ = self._item(index)
        return scene.caption(template)

    def group(self, index: int) -> int:
        return self.scene(index).group()

    def load(self, index: int, rng: random.Random | None = None):
        """(image tensor (3, S, S), caption) of item ``index``. The data is
        its own augmentation (``rng`` is unused: a random crop could move the
        shape out of the ninth its caption names)."""
        scene, template, item_rng = self._item(index)
        return to_tensor(render(scene, self.image_size, item_rng)), scene.caption(template)

    def zeroshot_tasks(self, indices) -> list[dict]:
        """Zero-shot classification of each attribute of items ``indices``.

        Each class is described by every template-0 caption that names it
        (the embeddings are averaged: prompt ensembling).
        """
        scenes = all_scenes()
        item_scenes = [self.scene(i) for i in indices]
        tasks = []
        for attr in ATTRIBUTES:
            classes = _VALUES[attr]
            prompts = [[s.caption() for s in scenes if getattr(s, attr) == c] for c in classes]
            labels = [classes.index(getattr(s, attr)) for s in item_scenes]
            tasks.append({"name": attr, "classes": list(classes), "prompts": prompts, "labels": labels})
        return tasks
