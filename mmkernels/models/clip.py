r"""A reference CLIP in pure PyTorch: ViT image tower, causal text Transformer.

Architecture (Radford et al. 2021; the layout of open_clip's ``CLIP``)
---------------------------------------------------------------------
Image tower (ViT)::

    patches  = conv(image, kernel = stride = patch_size)        (B, G*G, W)
    x        = [class_token; patches] + positions               (B, G*G + 1, W)
    x        = blocks(ln_pre(x))                                pre-LN blocks
    features = ln_post(x[:, 0]) @ proj                          (B, embed_dim)

Text tower::

    x        = token_embedding(tokens) + positions[:L]          (B, L, W)
    x        = ln_final(blocks(x, causal))
    features = x[b, eot_position[b]] @ proj                     (B, embed_dim)

where the end-of-text position is ``tokens.argmax(-1)`` (CLIP tokenizers give
the end-of-text token the largest id, ``pool="argmax"``) or the first
position of ``eos_token_id`` (``pool="eos"``). A pre-LN block is
``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` with multi-head attention by
``F.scaled_dot_product_attention`` and an MLP ``fc -> GELU -> proj``.

``logit_scale`` is a learnable log-temperature initialised to ln(1/0.07) and
clamped at ln(100) (CLIP's bound) where it is used; ``forward`` returns the
normalized features and ``logit_scale.exp()``, as open_clip's model does,
so its output feeds ``mmkernels.contrastive_loss`` or ``ClipLoss`` directly.

Named configs (:func:`list_clip_configs`): ``tiny`` (trains on a laptop CPU
in minutes) and the sizes of open_clip's ViT-B-32, ViT-B-16 and ViT-L-14
(GELU; pass ``act="quick_gelu"`` for OpenAI's original weights).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# CLIP's initial temperature 0.07 and its cap on the logit multiplier (100).
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)

ACTIVATIONS = ("gelu", "quick_gelu")
TEXT_POOLS = ("argmax", "eos")


# --- configs ----------------------------------------------------------------

@dataclass(frozen=True)
class _TransformerShape:
    """A tower's residual stack: ``layers`` pre-LN blocks of ``width`` channels,
    ``heads`` attention heads and MLPs of ``mlp_ratio * width``. The defaults are
    the image tower's; the text tower's config sets its own width and heads."""
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0


# Each tower's config is its input's fields, then its stack's: a dataclass takes
# the fields of its last base first, so the input comes last among the bases.

@dataclass(frozen=True)
class _ImageInput:
    image_size: int = 224
    patch_size: int = 32


@dataclass(frozen=True)
class _TextInput:
    context_length: int = 77
    vocab_size: int = 49408


@dataclass(frozen=True)
class VisionConfig(_TransformerShape, _ImageInput):
    """The ViT image tower: ``image_size``, ``patch_size``, then the stack's
    ``width``, ``layers``, ``heads``, ``mlp_ratio``."""


@dataclass(frozen=True)
class TextConfig(_TransformerShape, _TextInput):
    """The causal text Transformer: ``context_length``, ``vocab_size``, the stack's
    ``width``, ``layers``, ``heads``, ``mlp_ratio``, then ``pool`` and ``eos_token_id``.

    ``pool``: "argmax" takes the features at ``tokens.argmax(-1)`` (CLIP's
    tokenizers give end-of-text the largest id); "eos" takes them at the first
    occurrence of ``eos_token_id``.
    """
    width: int = 512
    heads: int = 8
    pool: str = "argmax"
    eos_token_id: int | None = None


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP: both towers, the shared embedding width and the details
    that must match when loading peer weights (activation, LayerNorm eps)."""
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    act: str = "gelu"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_logit_scale: float = INIT_LOGIT_SCALE

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act: expected one of {ACTIVATIONS}, got {self.act!r}")
        if self.text.pool not in TEXT_POOLS:
            raise ValueError(f"text pool: expected one of {TEXT_POOLS}, got {self.text.pool!r}")
        if self.text.pool == "eos" and self.text.eos_token_id is None:
            raise ValueError("text pool 'eos' needs text eos_token_id")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout}")
        for tower, cfg in (("vision", self.vision), ("text", self.text)):
            if cfg.width % cfg.heads:
                raise ValueError(f"{tower} width {cfg.width} is not divisible by its {cfg.heads} heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(f"image_size {self.vision.image_size} is not a multiple of "
                             f"patch_size {self.vision.patch_size}")


_CONFIGS: dict[str, CLIPConfig] = {
    # 32 x 32 images in 4 x 4 patches of 8 pixels, 4 layers of width 128 per
    # tower, the default tokenizer's hash vocabulary of 8192 words: 2.7M
    # parameters, about 0.75 CPU-second per step of 256 pairs on one core.
    "tiny": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=4, heads=4),
        text=TextConfig(context_length=32, vocab_size=8192, width=128, layers=4, heads=4),
    ),
    # open_clip's model_configs/ViT-*.json (heads = width / 64 in the image tower).
    "ViT-B-32": CLIPConfig(
        embed_dim=512,
        vision=VisionConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12),
        text=TextConfig(width=512, layers=12, heads=8),
    ),
    "ViT-B-16": CLIPConfig(
        embed_dim=512,
        vision=VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12),
        text=TextConfig(width=512, layers=12, heads=8),
    ),
    "ViT-L-14": CLIPConfig(
        embed_dim=768,
        vision=VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
        text=TextConfig(width=768, layers=12, heads=12),
    ),
}


def list_clip_configs() -> list[str]:
    """Names accepted by :func:`create_clip` and :func:`get_clip_config`."""
    return list(_CONFIGS)


def _override_targets() -> dict[str, tuple[str | None, str]]:
    """Flat override name -> (sub-config or None for the top level, field name).

    Tower fields take the prefix ``vision_``/``text_`` (``vision_width``,
    ``text_layers``); names that exist in one tower only are also accepted
    bare (``image_size``, ``patch_size``, ``context_length``, ``vocab_size``,
    ``pool``, ``eos_token_id``).
    """
    targets: dict[str, tuple[str | None, str]] = {}
    for f in dataclasses.fields(CLIPConfig):
        if f.name not in ("vision", "text"):
            targets[f.name] = (None, f.name)
    vision = {f.name for f in dataclasses.fields(VisionConfig)}
    text = {f.name for f in dataclasses.fields(TextConfig)}
    for name in vision:
        targets[f"vision_{name}"] = ("vision", name)
    for name in text:
        targets[f"text_{name}"] = ("text", name)
    for name in vision ^ text:
        targets[name] = ("vision" if name in vision else "text", name)
    return targets


def get_clip_config(name: str, **overrides) -> CLIPConfig:
    """The named config with ``overrides`` applied (see :func:`create_clip`)."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a config name (str), got {type(name).__name__}")
    if name not in _CONFIGS:
        raise ValueError(f"name: unknown CLIP config {name!r}; expected one of {list_clip_configs()}")
    config = _CONFIGS[name]
    targets = _override_targets()
    top, towers = {}, {"vision": {}, "text": {}}
    for key, value in overrides.items():
        if key not in targets:
            raise TypeError(f"create_clip: unknown override {key!r}; expected one of {sorted(targets)}")
        tower, attr = targets[key]
        (top if tower is None else towers[tower])[attr] = value
    return dataclasses.replace(
        config,
        vision=dataclasses.replace(config.vision, **towers["vision"]),
        text=dataclasses.replace(config.text, **towers["text"]),
        **top,
    )


def create_clip(name: str, **overrides) -> "CLIP":
    """A freshly initialised :class:`CLIP` of the named config.

    Args:
        name: one of :func:`list_clip_configs` ("tiny", "ViT-B-32", ...).
        **overrides: config fields to change: top-level ones (``embed_dim``,
            ``act``, ``norm_eps``, ``dropout``, ``init_logit_scale``), tower
            fields prefixed ``vision_`` or ``text_`` (``vision_layers=2``,
            ``text_width=256``), and the fields of one tower bare
            (``image_size``, ``patch_size``, ``context_length``, ``vocab_size``).

    Raises:
        ValueError for an unknown name or an inconsistent config, TypeError
        for an unknown override.
    """
    return CLIP(get_clip_config(name, **overrides))


# --- layers -------------------------------------------------------------------

class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (open_clip's
    ``in_proj`` layout: rows [q; k; v]) and scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = nn.GELU() if act == "gelu" else QuickGELU()
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LN residual block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, eps: float,
                 dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio), act)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), causal))
        return x + self.drop(self.mlp(self.ln_2(x)))


def _blocks(shape: _TransformerShape, act: str, eps: float, dropout: float) -> nn.ModuleList:
    """A tower's residual stack, with PyTorch's initialisation (:func:`_init_blocks` gives CLIP's)."""
    return nn.ModuleList(Block(shape.width, shape.heads, shape.mlp_ratio, act, eps, dropout)
                         for _ in range(shape.layers))


def _init_blocks(blocks: nn.ModuleList, width: int) -> None:
    """OpenAI CLIP's initialisation of a residual stack (projections into the
    residual stream scaled down with depth)."""
    attn_std = width ** -0.5
    proj_std = attn_std * (2 * len(blocks)) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.in_proj.weight, std=attn_std)
        nn.init.zeros_(block.attn.in_proj.bias)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(block.attn.out_proj.bias)
        nn.init.normal_(block.mlp.fc.weight, std=fc_std)
        nn.init.zeros_(block.mlp.fc.bias)
        nn.init.normal_(block.mlp.proj.weight, std=proj_std)
        nn.init.zeros_(block.mlp.proj.bias)


class VisionTower(nn.Module):
    """ViT: patch embedding, class token, learned positions, pre-LN blocks,
    LayerNorm of the class token, projection."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, act: str, eps: float, dropout: float):
        super().__init__()
        self.image_size = cfg.image_size
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width ** -0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                               bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=eps)
        self.blocks = _blocks(cfg, act, eps, dropout)
        self.ln_post = nn.LayerNorm(cfg.width, eps=eps)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim))
        _init_blocks(self.blocks, cfg.width)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (self.image_size,) * 2:
            raise ValueError(f"images: expected shape (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}")
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj


class TextTower(nn.Module):
    """Causal Transformer over token ids, pooled at the end-of-text token."""

    def __init__(self, cfg: TextConfig, embed_dim: int, act: str, eps: float, dropout: float):
        super().__init__()
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.pool = cfg.pool
        self.eos_token_id = cfg.eos_token_id
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = _blocks(cfg, act, eps, dropout)
        self.ln_final = nn.LayerNorm(cfg.width, eps=eps)
        self.proj = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.proj, std=cfg.width ** -0.5)
        _init_blocks(self.blocks, cfg.width)

    def end_positions(self, tokens: Tensor) -> Tensor:
        """Index of the end-of-text token of each sequence."""
        if self.pool == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_token_id).int().argmax(dim=-1)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= self.context_length:
            raise ValueError(f"tokens: expected shape (B, L) with 1 <= L <= {self.context_length}, "
                             f"got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens: expected int64 token ids, got {tokens.dtype}")
        ends = self.end_positions(tokens)
        # Causal attention: nothing after the last end-of-text token reaches a
        # pooled position, so the padding behind it is cut (exact, and cheaper).
        if tokens.shape[0]:
            tokens = tokens[:, : int(ends.max()) + 1]
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, causal=True)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), ends] @ self.proj


# --- the model ------------------------------------------------------------------

class CLIP(nn.Module):
    """CLIP: image and text towers projected into one embedding space.

    ``forward(images, tokens)`` returns ``(image_features, text_features,
    logit_scale)``: L2-normalized (B, embed_dim) features and the multiplier
    ``exp(logit_scale)`` (clamped at 100), the triple that
    ``mmkernels.ClipLoss`` and open_clip's ``ClipLoss`` take.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"config: expected a CLIPConfig, got {type(config).__name__}")
        self.config = config
        args = (config.embed_dim, config.act, config.norm_eps, config.dropout)
        self.visual = VisionTower(config.vision, *args)
        self.text = TextTower(config.text, *args)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """(B, 3, H, W) images (H = W = config.vision.image_size) -> (B, embed_dim) features."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """(B, L) token ids (L <= context_length) -> (B, embed_dim) features."""
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> Tensor:
        """The logit multiplier ``exp(logit_scale)``, clamped at 100."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter itself at ln(100) (after an optimizer step, as open_clip does)."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (self.encode_image(images, normalize=True),
                self.encode_text(tokens, normalize=True),
                self.scale())
