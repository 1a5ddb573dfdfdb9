"""Image-caption datasets from files: open_clip's CSV/TSV format and JSONL.

- CSV / TSV (``.csv``, ``.tsv``): a header row, one image path column and
  one caption column; open_clip's defaults "filepath" and "title", the
  separator "," for .csv and a tab for .tsv (open_clip's ``--csv-img-key``,
  ``--csv-caption-key``, ``--csv-separator``).
- JSONL (``.jsonl``): one JSON object per line, keys "image" and "caption"
  by default.

Relative image paths are resolved against the folder of the data file
(falling back to the current directory when the file is there instead).

Bad data never stops a run halfway through an epoch:

- a missing column, an empty file, or no usable row: ``ValueError`` when the
  dataset is opened, naming the file and what was found;
- rows with an empty caption or image path, and JSONL lines that do not
  parse: skipped when the file is read, counted in ``skipped_rows``;
- a missing or unreadable image: ``load`` raises :class:`SampleError`, which
  the batch loader counts and skips (mmkernels/data/loader.py).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmkernels.data.transforms import EvalTransform, TrainTransform

# Format -> default (image key, caption key).
DEFAULT_KEYS = {"csv": ("filepath", "title"), "tsv": ("filepath", "title"), "jsonl": ("image", "caption")}
SEPARATORS = {"csv": ",", "tsv": "\t"}


class SampleError(Exception):
    """One item could not be loaded (missing or unreadable image); the loader skips it."""


def data_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("csv", "tsv"):
        return suffix
    if suffix in ("jsonl", "json"):
        return "jsonl"
    raise ValueError(f"data: cannot tell the format of {str(path)!r} from its extension; expected "
                     ".csv, .tsv or .jsonl (or 'synthetic' for the built-in dataset)")


class CaptionFileDataset:
    """Image paths and captions from a CSV/TSV/JSONL file (see the module docstring).

    Args:
        path: the data file.
        image_size: side of the square model input.
        train: random resized crops (else resize + center crop).
        image_key, caption_key: the column / JSON key names (format defaults
            when None).
        separator: CSV separator (default from the extension).
    """

    def __init__(self, path: str | os.PathLike, image_size: int, *, train: bool = True,
                 image_key: str | None = None, caption_key: str | None = None,
                 separator: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"data: no such file {str(path)!r}")
        self.format = data_format(path)
        default_image, default_caption = DEFAULT_KEYS[self.format]
        self.image_key = image_key or default_image
        self.caption_key = caption_key or default_caption
        self.transform = TrainTransform(image_size) if train else EvalTransform(image_size)
        self.skipped_rows: Counter = Counter()
        if self.format == "jsonl":
            rows = self._read_jsonl()
        else:
            rows = self._read_csv(separator or SEPARATORS[self.format])
        self.images: list[str] = []
        self.captions: list[str] = []
        for image, caption in rows:
            image = "" if image is None else str(image).strip()
            caption = "" if caption is None else str(caption).strip()
            if not caption:
                self.skipped_rows["empty caption"] += 1
            elif not image:
                self.skipped_rows["empty image path"] += 1
            else:
                self.images.append(image)
                self.captions.append(caption)
        if not self.images:
            raise ValueError(f"data: {str(path)!r} has no usable row "
                             f"(skipped: {dict(self.skipped_rows) or 'none; the file is empty'})")
        self._base = self.path.resolve().parent

    def _read_csv(self, separator: str):
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            header = reader.fieldnames
            if not header:
                raise ValueError(f"data: {str(self.path)!r} is empty (expected a header row with "
                                 f"columns {self.image_key!r} and {self.caption_key!r})")
            missing = [k for k in (self.image_key, self.caption_key) if k not in header]
            if missing:
                hint = ""
                if len(header) == 1 and any(s in header[0] for s in ",\t;|"):
                    hint = f" (one column: is the separator {separator!r} right?)"
                raise ValueError(f"data: {str(self.path)!r} has no column {missing[0]!r}; header "
                                 f"columns: {header}{hint}. Choose the columns with --image-key "
                                 "and --caption-key")
            return [(row.get(self.image_key), row.get(self.caption_key)) for row in reader]

    def _read_jsonl(self):
        rows, seen_keys = [], False
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    self.skipped_rows["invalid JSON line"] += 1
                    continue
                if not isinstance(obj, dict):
                    self.skipped_rows["JSON line is not an object"] += 1
                    continue
                if self.image_key in obj or self.caption_key in obj:
                    seen_keys = True
                rows.append((obj.get(self.image_key), obj.get(self.caption_key)))
        if rows and not seen_keys:
            raise ValueError(f"data: no line of {str(self.path)!r} has the key {self.image_key!r} or "
                             f"{self.caption_key!r}; choose the keys with --image-key and --caption-key")
        return rows

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        path = Path(self.images[index])
        if path.is_absolute():
            return path
        beside = self._base / path
        return beside if beside.exists() or not path.exists() else path

    def caption(self, index: int) -> str:
        return self.captions[index]

    def group(self, index: int) -> str:
        """Items that show the same image are one group for retrieval."""
        return str(self.image_path(index))

    def load(self, index: int, rng: random.Random | None = None):
        """(image tensor (3, S, S), caption); :class:`SampleError` if the image cannot be read."""
        path = self.image_path(index)
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except FileNotFoundError:
            raise SampleError(f"missing image file {str(path)!r}") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise SampleError(f"unreadable image {str(path)!r}: {exc}") from None
        return self.transform(image, rng), self.captions[index]
