"""Reference models: a pure-PyTorch CLIP, its tokenizers and weight interop.

- :func:`list_clip_configs`, :func:`create_clip`: named CLIP configs
  ("tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14") and freshly initialised models.
- :class:`CLIP`: ``encode_image``, ``encode_text`` (``normalize`` flag),
  ``forward(images, tokens) -> (image_features, text_features, logit_scale)``.
- :func:`get_tokenizer`: the self-contained default tokenizer or yours.
- :func:`from_hf`, :func:`from_open_clip` (and the ``load_*_state_dict``
  functions): weights of transformers' CLIPModel and open_clip's ViT CLIP.
"""

from mmkernels.models.clip import (CLIP, CLIPConfig, TextConfig, VisionConfig, create_clip,
                                   get_clip_config, list_clip_configs)
from mmkernels.models.interop import (from_hf, from_open_clip, load_hf_state_dict,
                                      load_open_clip_state_dict)
from mmkernels.models.tokenizer import HashTokenizer, get_tokenizer

__all__ = [
    "CLIP",
    "CLIPConfig",
    "HashTokenizer",
    "TextConfig",
    "VisionConfig",
    "create_clip",
    "from_hf",
    "from_open_clip",
    "get_clip_config",
    "get_tokenizer",
    "list_clip_configs",
    "load_hf_state_dict",
    "load_open_clip_state_dict",
]
