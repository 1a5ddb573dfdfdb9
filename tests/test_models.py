"""The reference CLIP: configs, forward semantics, tokenizers, and weight interop
with transformers' CLIPModel and open_clip's CLIP (peers built with random
weights, no download: embeddings must match)."""

import json
import math
import os

import pytest
import torch

from mmkernels.models import (CLIP, HashTokenizer, create_clip, from_hf, from_open_clip,
                              get_clip_config, get_tokenizer, list_clip_configs, load_hf_state_dict,
                              load_open_clip_state_dict)

SMALL = dict(embed_dim=24, image_size=16, patch_size=4, vision_width=32, vision_layers=2,
             vision_heads=4, text_width=32, text_layers=2, text_heads=4, context_length=12,
             vocab_size=100)


def small_clip(**kw):
    return create_clip("tiny", **{**SMALL, **kw})


def _perturb(module, seed=1):
    """Random values in every parameter (biases and LayerNorms too), so a
    mis-mapped tensor cannot hide behind a zero or one initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _tokens(batch, length, vocab, eot, pad_tail=True):
    """Rows [sot, words..., eot, 0...] with eot the largest id, of varied lengths."""
    g = torch.Generator().manual_seed(2)
    t = torch.randint(1, eot - 1, (batch, length), generator=g)
    t[:, 0] = eot - 1
    for i in range(batch):
        end = 2 + (3 * i) % (length - 2)
        t[i, end] = eot
        if pad_tail:
            t[i, end + 1:] = 0
    return t


# --- configs ----------------------------------------------------------------------

def test_named_configs_exist():
    assert {"tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14"} <= set(list_clip_configs())


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_big_configs_match_open_clip_sizes(name):
    """Same parameter count as open_clip's config of that name (both on the meta device)."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP as OpenClipCLIP

    path = os.path.join(os.path.dirname(open_clip.__file__), "model_configs", f"{name}.json")
    with open(path) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        theirs = OpenClipCLIP(**cfg)
        ours = create_clip(name)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in load_open_clip_shapes(theirs).items()}


def load_open_clip_shapes(oc_model):
    from mmkernels.models.interop import convert_open_clip_state_dict
    return convert_open_clip_state_dict(oc_model.state_dict())


def test_overrides():
    cfg = get_clip_config("tiny", vision_layers=2, text_width=64, text_heads=2, image_size=64,
                          context_length=20, dropout=0.1, act="quick_gelu")
    assert (cfg.vision.layers, cfg.text.width, cfg.vision.image_size, cfg.text.context_length) == (2, 64, 64, 20)
    assert cfg.dropout == 0.1 and cfg.act == "quick_gelu"
    assert get_clip_config("tiny").vision.layers == 4  # the named config is untouched


def test_config_errors():
    with pytest.raises(ValueError, match="unknown CLIP config 'nope'"):
        create_clip("nope")
    with pytest.raises(TypeError, match="unknown override 'widht'"):
        create_clip("tiny", widht=3)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        create_clip("tiny", image_size=30)
    with pytest.raises(ValueError, match="not divisible by its 3 heads"):
        create_clip("tiny", text_heads=3)
    with pytest.raises(ValueError, match="act"):
        create_clip("tiny", act="relu")


# --- forward semantics ------------------------------------------------------------------

def test_forward_contract():
    model = small_clip()
    images, tokens = torch.randn(5, 3, 16, 16), _tokens(5, 12, 100, 99)
    image_features, text_features, scale = model(images, tokens)
    assert image_features.shape == text_features.shape == (5, 24)
    torch.testing.assert_close(image_features.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(text_features.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07))
    raw = model.encode_image(images)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), image_features)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(5))


def test_logit_scale_is_clamped_at_100():
    model = small_clip()
    with torch.no_grad():
        model.logit_scale.fill_(6.0)
    torch.testing.assert_close(model.scale(), torch.tensor(100.0))
    model.clamp_logit_scale_()
    assert math.isclose(float(model.logit_scale.detach()), math.log(100), rel_tol=1e-6)


def test_text_pools_at_end_of_text_and_ignores_padding():
    """Features come from the end-of-text position: what follows it (padding,
    or anything else) does not matter, and neither does the padded length."""
    model = small_clip().eval()
    _perturb(model)
    tokens = _tokens(4, 12, 100, 99)
    base = model.encode_text(tokens)
    noisy = tokens.clone()
    for i in range(4):
        end = int((tokens[i] == 99).nonzero()[0])
        noisy[i, end + 1:] = torch.randint(1, 98, (11 - end,))
    torch.testing.assert_close(model.encode_text(noisy), base)
    short = tokens[:, : int((tokens == 99).int().argmax(1).max()) + 1]
    torch.testing.assert_close(model.encode_text(short), base)
    changed = tokens.clone()
    changed[0, 1] = (changed[0, 1] % 90) + 1 + (changed[0, 1] == 1)
    assert not torch.allclose(model.encode_text(changed)[0], base[0])


def test_input_errors():
    model = small_clip()
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 3, 16, 16\)"):
        model.encode_image(torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match="tokens: expected int64"):
        model.encode_text(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="tokens: expected shape"):
        model.encode_text(torch.zeros(2, 13, dtype=torch.long))


def test_dropout_is_random_in_training_only():
    model = small_clip(dropout=0.2)
    images = torch.randn(3, 3, 16, 16)
    assert not torch.equal(model.encode_image(images), model.encode_image(images))
    model.eval()
    torch.testing.assert_close(model.encode_image(images), model.encode_image(images))


# --- tokenizers -------------------------------------------------------------------

def test_hash_tokenizer():
    tok = HashTokenizer(vocab_size=1000, context_length=8)
    ids = tok(["A red circle.", "a RED circle", ""])
    assert ids.shape == (3, 8) and ids.dtype == torch.long
    assert ids[0, 0] == 998 and ids[0, 5] == 999 and ids[0, 6:].eq(0).all()  # sot a red circle . eot
    assert torch.equal(ids[1, 1:4], ids[0, 1:4])  # case-insensitive
    assert ids[2, :2].tolist() == [998, 999]
    long = tok(["one two three four five six seven eight nine"])
    assert long[0, -1] == 999 and long.argmax(1) == 7  # truncated, end-of-text kept, largest id
    assert (ids < 1000).all() and (ids[ids > 0][1:] >= 1).all()
    assert tok("x", context_length=4).shape == (1, 4)


def test_hash_tokenizer_has_no_collisions_on_the_synthetic_words():
    from mmkernels.data import synthetic

    words = set()
    for template in synthetic.TEMPLATES:
        words.update(HashTokenizer().words(template.format(shape="", colour="", size="", where="")))
    for values in (synthetic.SHAPES, synthetic.COLOURS, synthetic.SIZES, synthetic._WHERE.values()):
        for v in values:
            words.update(HashTokenizer().words(v))
    cfg = get_clip_config("tiny")
    tok = get_tokenizer("hash", vocab_size=cfg.text.vocab_size, context_length=cfg.text.context_length)
    assert len({tok.word_id(w) for w in words}) == len(words)


def test_tokenizer_hook():
    assert get_tokenizer("mmkernels.models.tokenizer:HashTokenizer").vocab_size == 49408
    mine = lambda texts: torch.zeros(len(texts), 3, dtype=torch.long)  # noqa: E731
    assert get_tokenizer(mine) is mine
    with pytest.raises(ValueError, match="cannot import 'Nope'"):
        get_tokenizer("mmkernels.models.tokenizer:Nope")
    with pytest.raises(ValueError, match="unknown spec 'bpe'"):
        get_tokenizer("bpe")


def test_clip_bpe_tokenizer_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    tok = get_tokenizer("clip-bpe", context_length=77)
    assert tok.vocab_size == 49408
    torch.testing.assert_close(tok(["a photo of a cat"]), open_clip.tokenize(["a photo of a cat"]))


# --- weight interop -----------------------------------------------------------------

def _hf_model(act, eos):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=12, hidden_act=act,
                bos_token_id=98, eos_token_id=eos, pad_token_id=0)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  image_size=16, patch_size=4, hidden_act=act)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    _perturb(model)
    return model


def _features(out):
    return getattr(out, "pooler_output", out)  # transformers 5 returns a model output


@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("gelu", 99)])
def test_from_hf_gives_identical_embeddings(act, eos):
    hf = _hf_model(act, eos)
    ours = from_hf(hf).eval()
    assert ours.config.act == act and ours.config.text.pool == ("argmax" if eos == 2 else "eos")
    images = torch.randn(3, 3, 16, 16)
    tokens = _tokens(3, 12, 100, 99)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images),
                                   _features(hf.get_image_features(pixel_values=images)),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens),
                                   _features(hf.get_text_features(input_ids=tokens)),
                                   rtol=1e-5, atol=1e-5)
        out = hf(input_ids=tokens, pixel_values=images)
        image_features, text_features, scale = ours(images, tokens)
        torch.testing.assert_close(scale * image_features @ text_features.T, out.logits_per_image,
                                   rtol=1e-5, atol=1e-4)


def test_hf_weights_into_a_named_config_and_mismatch():
    hf = _hf_model("quick_gelu", 2)
    model = small_clip(vision_width=48, vision_heads=4, act="quick_gelu", vision_mlp_ratio=2.0,
                       text_mlp_ratio=2.5)
    load_hf_state_dict(model, hf.state_dict())
    with torch.no_grad():
        images = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(model.eval().encode_image(images),
                                   _features(hf.get_image_features(pixel_values=images)),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"visual\.[\w.]+ has shape \(48, .*\) in the weights, "
                                         r"\(32, .*\) in the model"):
        load_hf_state_dict(small_clip(), hf.state_dict())
    with pytest.raises(ValueError, match="do not fit this CLIP.*missing"):
        load_hf_state_dict(small_clip(vision_layers=3, vision_width=48, vision_mlp_ratio=2.0,
                                      text_mlp_ratio=2.5), hf.state_dict())


def _open_clip_model(custom_text=False, **vision_extra):
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP as OpenClipCLIP, CustomTextCLIP

    torch.manual_seed(0)
    cls = CustomTextCLIP if custom_text else OpenClipCLIP
    model = cls(embed_dim=24, quick_gelu=not custom_text,
                vision_cfg=dict(image_size=16, patch_size=4, width=64, layers=2, head_width=16,
                                **vision_extra),
                text_cfg=dict(context_length=12, vocab_size=100, width=32, heads=4, layers=2)).eval()
    _perturb(model)
    return model


@pytest.mark.parametrize("custom_text", [False, True])
def test_from_open_clip_gives_identical_embeddings(custom_text):
    oc = _open_clip_model(custom_text)
    ours = from_open_clip(oc).eval()
    images, tokens = torch.randn(3, 3, 16, 16), _tokens(3, 12, 100, 99)
    with torch.no_grad():
        for got, want in zip(ours(images, tokens), oc(images, tokens)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the same weights, loaded into a model built from the named config + overrides
    model = small_clip(vision_width=64, act="quick_gelu" if not custom_text else "gelu")
    load_open_clip_state_dict(model, oc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_text(tokens), oc.encode_text(tokens),
                                   rtol=1e-5, atol=1e-6)


def test_open_clip_unsupported_variants_are_named():
    oc = _open_clip_model(ls_init_value=0.1)  # layer scale: not in this architecture
    with pytest.raises(ValueError, match="unsupported tensor.*ls_1"):
        from_open_clip(oc)
    with pytest.raises(TypeError, match="expected an mmkernels CLIP"):
        load_open_clip_state_dict(torch.nn.Linear(2, 2), {})
    assert isinstance(from_open_clip(_open_clip_model()), CLIP)
