"""Weight interop: load Hugging Face ``transformers`` CLIPModel and open_clip
ViT CLIP weights into :class:`~mmkernels.models.clip.CLIP`.

Both peers compute exactly the architecture of clip.py; only names and
layouts differ:

=======================================  ==========================================
peer                                     here
=======================================  ==========================================
HF ``self_attn.{q,k,v}_proj`` (3 Linear) ``attn.in_proj`` (rows [q; k; v])
HF ``visual_projection.weight`` (E, W)   ``visual.proj`` (W, E), its transpose
open_clip ``attn.in_proj_weight``        ``attn.in_proj.weight``
open_clip ``mlp.c_fc`` / ``mlp.c_proj``  ``mlp.fc`` / ``mlp.proj``
=======================================  ==========================================

``from_hf(model)`` / ``from_open_clip(model)`` build the matching config
from the peer model and return a CLIP with its weights;
``load_hf_state_dict`` / ``load_open_clip_state_dict`` load a peer state
dict into an existing CLIP (e.g. ``create_clip("ViT-B-32",
act="quick_gelu")`` for OpenAI's weights) and raise ``ValueError`` naming
the tensor when a shape does not match. Neither peer package is needed to
convert a state dict; only the ``from_*`` helpers read the peer's config.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from mmkernels.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig

StateDict = dict[str, Tensor]


# --- shared -------------------------------------------------------------------

def _load_checked(model: CLIP, converted: StateDict, source: str) -> CLIP:
    """Load a converted state dict, strict, with messages that name the tensor."""
    if not isinstance(model, CLIP):
        raise TypeError(f"model: expected an mmkernels CLIP, got {type(model).__name__}")
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} weights do not fit this CLIP (layers differ?): "
                         f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                         f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    for name, tensor in converted.items():
        if tensor.shape != own[name].shape:
            raise ValueError(f"{source} weights do not fit this CLIP: {name} has shape "
                             f"{tuple(tensor.shape)} in the weights, {tuple(own[name].shape)} in the model")
    model.load_state_dict(converted, strict=True)
    return model


def _rename(state_dict: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    """Apply the first matching regex rule to each name; names no rule matches are errors."""
    out: StateDict = {}
    for name, tensor in state_dict.items():
        for pattern, replacement in rules:
            new, hits = re.subn(pattern, replacement, name)
            if hits:
                out[new] = tensor
                break
        else:
            raise ValueError(f"unsupported tensor {name!r}: this CLIP has no counterpart for it")
    return out


# --- Hugging Face transformers ------------------------------------------------

_HF_RULES = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
    (r"^vision_model\.embeddings\.patch_embedding\.weight$", "visual.conv1.weight"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."),
    (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"^vision_model\.encoder\.layers\.", "visual.blocks."),
    (r"^text_model\.embeddings\.token_embedding\.", "text.token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "text.positional_embedding"),
    (r"^text_model\.final_layer_norm\.", "text.ln_final."),
    (r"^text_model\.encoder\.layers\.", "text.blocks."),
    (r"^logit_scale$", "logit_scale"),
]
_HF_BLOCK_RULES = [
    (r"\.layer_norm1\.", ".ln_1."),
    (r"\.layer_norm2\.", ".ln_2."),
    (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
    (r"\.mlp\.fc1\.", ".mlp.fc."),
    (r"\.mlp\.fc2\.", ".mlp.proj."),
]


def convert_hf_state_dict(state_dict: StateDict) -> StateDict:
    """A transformers ``CLIPModel`` state dict in this CLIP's names and layouts."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: StateDict = {}
    # Projections: Linear weights (E, W) become right-multiplied (W, E) matrices.
    for peer, ours in (("visual_projection.weight", "visual.proj"),
                       ("text_projection.weight", "text.proj")):
        if peer not in sd:
            raise ValueError(f"not a transformers CLIPModel state dict: {peer!r} is missing")
        if f"{peer[:-len('.weight')]}.bias" in sd:
            raise ValueError(f"unsupported tensor {peer[:-len('.weight')]}.bias: projections here have no bias")
        out[ours] = sd.pop(peer).t().contiguous()
    # Attention: three Linear layers become one fused in_proj, rows [q; k; v].
    for name in [k for k in sd if ".self_attn.q_proj." in k]:
        prefix, kind = name.split(".self_attn.q_proj.")
        parts = [sd.pop(f"{prefix}.self_attn.{p}_proj.{kind}") for p in "qkv"]
        sd[f"{prefix}.attn.in_proj.{kind}"] = torch.cat(parts, dim=0)
    for name, tensor in _rename(sd, _HF_RULES).items():
        for pattern, replacement in _HF_BLOCK_RULES:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor
    return out


def _hf_act(act: str) -> str:
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"unsupported activation {act!r}: this CLIP has 'gelu' and 'quick_gelu'")
    return act


def clip_config_from_hf(config) -> CLIPConfig:
    """The :class:`CLIPConfig` of a transformers ``CLIPConfig``."""
    v, t = config.vision_config, config.text_config
    if _hf_act(v.hidden_act) != _hf_act(t.hidden_act):
        raise ValueError(f"unsupported: the towers use different activations "
                         f"({v.hidden_act!r}, {t.hidden_act!r})")
    if v.layer_norm_eps != t.layer_norm_eps:
        raise ValueError(f"unsupported: the towers use different LayerNorm eps "
                         f"({v.layer_norm_eps}, {t.layer_norm_eps})")
    # transformers pools at argmax(ids) for the legacy eos_token_id 2, else at
    # the first eos_token_id.
    eos = t.eos_token_id
    pool = {"pool": "argmax"} if eos == 2 or eos is None else {"pool": "eos", "eos_token_id": eos}
    return CLIPConfig(
        embed_dim=config.projection_dim,
        vision=VisionConfig(image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                            layers=v.num_hidden_layers, heads=v.num_attention_heads,
                            mlp_ratio=v.intermediate_size / v.hidden_size),
        text=TextConfig(context_length=t.max_position_embeddings, vocab_size=t.vocab_size,
                        width=t.hidden_size, layers=t.num_hidden_layers,
                        heads=t.num_attention_heads, mlp_ratio=t.intermediate_size / t.hidden_size,
                        **pool),
        act=v.hidden_act,
        norm_eps=v.layer_norm_eps,
        init_logit_scale=config.logit_scale_init_value,
    )


def load_hf_state_dict(model: CLIP, state_dict: StateDict) -> CLIP:
    """Load a transformers ``CLIPModel`` state dict into ``model`` (in place; returned)."""
    return _load_checked(model, convert_hf_state_dict(state_dict), "transformers CLIPModel")


def from_hf(hf_model) -> CLIP:
    """A CLIP with the config and weights of a transformers ``CLIPModel``."""
    model = CLIP(clip_config_from_hf(hf_model.config))
    return load_hf_state_dict(model, hf_model.state_dict())


# --- open_clip ------------------------------------------------------------------

_OPEN_CLIP_RULES = [
    (r"^visual\.transformer\.resblocks\.", "visual.blocks."),
    (r"^visual\.(conv1\.weight|class_embedding|positional_embedding|ln_pre\.\w+|ln_post\.\w+|proj)$",
     r"visual.\1"),
    # CLIP keeps the text tower at the top level; CustomTextCLIP under "text.".
    (r"^(?:text\.)?transformer\.resblocks\.", "text.blocks."),
    (r"^(?:text\.)?(token_embedding\.weight|positional_embedding|ln_final\.\w+)$", r"text.\1"),
    (r"^(?:text\.)?text_projection$", "text.proj"),
    (r"^logit_scale$", "logit_scale"),
]
_OPEN_CLIP_BLOCK_RULES = [
    (r"\.attn\.in_proj_weight$", ".attn.in_proj.weight"),
    (r"\.attn\.in_proj_bias$", ".attn.in_proj.bias"),
    (r"\.mlp\.c_fc\.", ".mlp.fc."),
    (r"\.mlp\.c_proj\.", ".mlp.proj."),
]
_OPEN_CLIP_BLOCK_PARTS = re.compile(r"\.blocks\.\d+\.(ln_1|ln_2|attn\.in_proj|attn\.out_proj|mlp\.fc|mlp\.proj)\.")


def convert_open_clip_state_dict(state_dict: StateDict) -> StateDict:
    """An open_clip ViT ``CLIP`` state dict in this CLIP's names (same layouts)."""
    sd = {k: v for k, v in state_dict.items() if k != "attn_mask"}
    if "logit_bias" in sd:
        raise ValueError("unsupported tensor 'logit_bias': a SigLIP-style model; this CLIP has no logit bias")
    out: StateDict = {}
    for name, tensor in _rename(sd, _OPEN_CLIP_RULES).items():
        for pattern, replacement in _OPEN_CLIP_BLOCK_RULES:
            name = re.sub(pattern, replacement, name)
        if ".blocks." in name and not _OPEN_CLIP_BLOCK_PARTS.search(name):
            raise ValueError(f"unsupported tensor {name!r} in a residual block (layer scale? "
                             "qk-norm?): this CLIP has plain pre-LN blocks")
        out[name] = tensor
    return out


def clip_config_from_open_clip(model) -> CLIPConfig:
    """The :class:`CLIPConfig` of an open_clip ViT ``CLIP`` (or ``CustomTextCLIP``
    with open_clip's own text Transformer)."""
    from open_clip.transformer import QuickGELU, TextTransformer, VisionTransformer

    visual = model.visual
    text = getattr(model, "text", model)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"unsupported image tower {type(visual).__name__}: only open_clip's "
                         "VisionTransformer maps onto this CLIP")
    if text is not model and not isinstance(text, TextTransformer):
        raise ValueError(f"unsupported text tower {type(text).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError("unsupported image pooling: this CLIP pools the class token then applies ln_post")
    pool_type = model.text_pool_type if text is model else text.pool_type
    eos_id = getattr(model, "text_eos_id", None) if text is model else text.eos_id
    if pool_type not in ("argmax", "eos"):
        raise ValueError(f"unsupported text pooling {pool_type!r}")
    v_block, t_block = visual.transformer.resblocks[0], text.transformer.resblocks[0]
    for block in (v_block, t_block):
        if not isinstance(block.attn, torch.nn.MultiheadAttention):
            raise ValueError("unsupported residual block type (custom attention)")
    acts = {("quick_gelu" if isinstance(b.mlp.gelu, QuickGELU) else "gelu") for b in (v_block, t_block)}
    if len(acts) != 1:
        raise ValueError("unsupported: the towers use different activations")
    if visual.grid_size[0] != visual.grid_size[1]:
        raise ValueError(f"unsupported: non-square patch grid {visual.grid_size}")
    v_width = visual.conv1.weight.shape[0]
    t_width = text.token_embedding.weight.shape[1]
    proj = text.text_projection
    if not isinstance(proj, torch.nn.Parameter):
        raise ValueError("unsupported text projection (Linear with bias or none); expected a matrix")
    return CLIPConfig(
        embed_dim=visual.proj.shape[1],
        vision=VisionConfig(image_size=visual.image_size[0], patch_size=visual.patch_size[0],
                            width=v_width, layers=len(visual.transformer.resblocks),
                            heads=v_block.attn.num_heads,
                            mlp_ratio=v_block.mlp.c_fc.out_features / v_width),
        text=TextConfig(context_length=text.positional_embedding.shape[0],
                        vocab_size=text.token_embedding.weight.shape[0], width=t_width,
                        layers=len(text.transformer.resblocks), heads=t_block.attn.num_heads,
                        mlp_ratio=t_block.mlp.c_fc.out_features / t_width, pool=pool_type,
                        eos_token_id=eos_id if pool_type == "eos" else None),
        act=acts.pop(),
        norm_eps=v_block.ln_1.eps,
        init_logit_scale=float(model.logit_scale.detach()),
    )


def load_open_clip_state_dict(model: CLIP, state_dict: StateDict) -> CLIP:
    """Load an open_clip ViT CLIP state dict into ``model`` (in place; returned)."""
    return _load_checked(model, convert_open_clip_state_dict(state_dict), "open_clip")


def from_open_clip(oc_model) -> CLIP:
    """A CLIP with the config and weights of an open_clip ViT CLIP model."""
    model = CLIP(clip_config_from_open_clip(oc_model))
    return load_open_clip_state_dict(model, oc_model.state_dict())
