r"""Fine-tuning a Hugging Face ``CLIPModel`` or ``SiglipModel`` from a local folder.

``python -m mmkernels.train --hf-model DIR`` loads the model and its processor
from DIR with ``local_files_only=True`` (nothing is downloaded), and trains
them with the trainer's loop: the fused loss, gradient caching, checkpoints,
evaluation; at the end the model and the processor are written with
``save_pretrained`` to ``OUTPUT/hf``, which ``CLIPModel.from_pretrained``
(or ``SiglipModel``) and ``AutoProcessor.from_pretrained`` load back.

The pieces:

- :class:`HFContrastiveModel` gives the transformers model the interface the
  trainer's step and evaluation use: ``encode_image``, ``encode_text`` and a
  forward returning the normalized features and the loss's parameters,
  ``(image, text, exp(logit_scale))`` for CLIP, ``(..., logit_bias)`` too
  for SigLIP. The features are those of the model's own forward (the
  ``pooler_output`` of ``get_image_features`` / ``get_text_features``, read
  as mmkernels.integrations.transformers reads it), so the loss is the
  model's ``return_loss=True`` loss: :func:`mmkernels.integrations.transformers.clip_loss`
  and ``siglip_loss`` compute the same value from the same batch.
- :class:`ProcessorDataset` passes each image of the data (synthetic or a
  file's, after the dataset's crop at the model's input size) through the
  processor's image pipeline (Pillow: resize, crop, rescale, its own mean
  and std); :class:`ProcessorTokenizer` the captions through its tokenizer,
  padded to the model's context length. No attention mask is passed: CLIP's
  text tower is causal and pools the end-of-text token, so the padding after
  it never reaches the features; SigLIP was trained on captions padded to
  ``max_length``, without a mask, as its model card prescribes.

transformers is an optional dependency (``pip install transformers``);
this module imports it only when a model is loaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import mmkernels
from mmkernels.data.transforms import CLIP_MEAN, CLIP_STD
from mmkernels.integrations.transformers import _pooled

# The bound on CLIP's multiplier, as the reference CLIP's (open_clip's) clamp.
MAX_LOGIT_SCALE = math.log(100)
KINDS = {"clip": "CLIPModel", "siglip": "SiglipModel"}


def load_pretrained(path: str | Path):
    """(model, processor) from the folder ``path``, offline: a ``CLIPModel`` or
    ``SiglipModel`` (by its config's ``model_type``) and its processor.

    Raises ValueError for a missing folder or another model type.
    """
    try:
        import transformers
    except ImportError:
        raise ValueError("--hf-model needs transformers (pip install transformers)") from None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"--hf-model: no config.json in {str(path)!r} (a folder written by "
                         "save_pretrained, e.g. a downloaded openai/clip-vit-base-patch32)")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in KINDS:
        raise ValueError(f"--hf-model: {str(path)!r} holds a {config.model_type!r} model; expected "
                         f"one of {', '.join(KINDS.values())}")
    model = getattr(transformers, KINDS[config.model_type]).from_pretrained(path, local_files_only=True)
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


class HFContrastiveModel(nn.Module):
    """A transformers ``CLIPModel`` / ``SiglipModel`` as the trainer drives a CLIP.

    ``forward(pixel_values, input_ids)`` returns the L2-normalized image and
    text features (in the model's dtype) and the loss's parameters:
    ``exp(logit_scale)``, and for SigLIP ``logit_bias``; :meth:`loss_function`
    is the loss they feed.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        self.kind = "siglip" if hasattr(model, "logit_bias") else "clip"

    @property
    def image_size(self) -> int:
        return int(self.hf.config.vision_config.image_size)

    @property
    def context_length(self) -> int:
        return int(self.hf.config.text_config.max_position_embeddings)

    def encode_image(self, pixel_values: Tensor, normalize: bool = False) -> Tensor:
        features = _pooled(self.hf.get_image_features(pixel_values=pixel_values), "get_image_features")
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids: Tensor, normalize: bool = False) -> Tensor:
        features = _pooled(self.hf.get_text_features(input_ids=input_ids), "get_text_features")
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> Tensor:
        """The logit multiplier ``exp(logit_scale)`` (what the model's forward uses)."""
        return self.hf.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """CLIP: clamp the log-scale to [0, ln 100] after a step, as the reference
        CLIP does (OpenAI's checkpoint sits at ln 100). SigLIP: unbounded."""
        if self.kind == "clip":
            self.hf.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def forward(self, pixel_values: Tensor, input_ids: Tensor):
        image = self.encode_image(pixel_values, normalize=True)
        text = self.encode_text(input_ids, normalize=True)
        if self.kind == "clip":
            return image, text, self.scale()
        return image, text, self.scale(), self.hf.logit_bias

    def loss_function(self, backend: str):
        """``loss_fn(image, text, *parameters)`` of this model's loss on normalized features."""
        if self.kind == "clip":
            return lambda image, text, scale: mmkernels.contrastive_loss(image, text, scale,
                                                                         backend=backend)
        # Texts as rows, as the model's logits_per_text (the integration's siglip_loss).
        return lambda image, text, scale, bias: mmkernels.siglip_loss(text, image, scale, bias,
                                                                      backend=backend)

    def config_dict(self) -> dict:
        return self.hf.config.to_dict()

    def save_pretrained(self, path: Path, processor) -> None:
        """The model and the processor, loadable by transformers' ``from_pretrained``."""
        self.hf.save_pretrained(path)
        processor.save_pretrained(path)


class ProcessorTokenizer:
    """Captions -> (B, context_length) input ids by the processor's tokenizer."""

    def __init__(self, processor, context_length: int):
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.context_length = context_length

    def __call__(self, texts) -> Tensor:
        return self.tokenizer(list(texts), padding="max_length", truncation=True,
                              max_length=self.context_length, return_tensors="pt")["input_ids"]


_MEAN = np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]
_STD = np.array(CLIP_STD, dtype=np.float32)[:, None, None]


def _pixels(image: Tensor) -> Image.Image:
    """The RGB image behind a tensor of :func:`mmkernels.data.transforms.to_tensor`
    (an affine map of the uint8 pixels: rounding inverts it exactly)."""
    values = (image.numpy() * _STD + _MEAN) * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8).transpose(1, 2, 0))


class ProcessorDataset:
    """A dataset of :mod:`mmkernels.data` whose images go through ``processor``.

    The dataset, opened at the model's input size, keeps its own choices of
    the image (the synthetic rendering; a file's random crop for training,
    center crop for evaluation); the processor then does the model's
    preprocessing (at that size its resize and crop leave the image as is).
    """

    def __init__(self, dataset, processor):
        self.dataset = dataset
        self.image_processor = getattr(processor, "image_processor", processor)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # caption, group, zeroshot_tasks, skipped_rows, ...
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def load(self, index: int, rng=None):
        image, caption = self.dataset.load(index, rng)
        pixel_values = self.image_processor(images=_pixels(image), return_tensors="pt")["pixel_values"]
        return pixel_values[0], caption
